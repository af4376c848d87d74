"""edgefl: broker."""
