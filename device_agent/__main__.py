"""``python -m device_agent [--config agent.toml] [--set key=value ...]``: the same as
``edgefl agent`` (useful before the console script is installed, and in tests), with the same
error lines and exit codes."""

from device_agent.cli import main

if __name__ == "__main__":
    main()
