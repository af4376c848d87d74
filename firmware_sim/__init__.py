"""edgefl: firmware_sim."""
