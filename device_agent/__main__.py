"""``python -m device_agent [--config agent.toml] [--set key=value ...]``: the same as
``edgefl agent`` (useful before the console script is installed, and in tests)."""

from device_agent.cli import agent_app

if __name__ == "__main__":
    agent_app(prog_name="edgefl agent")
