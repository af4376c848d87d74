"""edgefl: device_agent."""
