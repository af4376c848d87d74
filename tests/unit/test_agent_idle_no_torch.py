"""The README's promise: an idle agent never loads torch.

A clean interpreter runs a real :class:`DeviceAgent` on the in-process MemoryBroker: it connects,
accepts a retained model (manifest, chunks, hash check, model store) and reports itself idle
because it is on battery. Only then does the script look at ``sys.modules``. A module-level
``import torch`` anywhere on that path (agent, trainer, model store, codec, data) fails this test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path

    import numpy as np

    from device_agent.agent import DeviceAgent
    from device_agent.config import AgentConfig, BrokerConfig, DataConfig, DataKind, ProbeConfig
    from device_agent.dataset import LocalDataset
    from device_agent.eligibility import EligibilityPolicy, MeteredSource
    from device_agent.release import model_release
    from edgefl.models.spec import get_model_spec, init_weights_numpy
    from edgefl.transport import MemoryBroker, MemoryTransport

    tmp = Path(sys.argv[1])
    fs = tmp / "fs"
    for path, text in {
        "proc/loadavg": "0.00 0.00 0.00 1/100 1\\n",
        "proc/cpuinfo": "processor : 0\\n",
        "sys/class/power_supply/AC/type": "Mains\\n",
        "sys/class/power_supply/AC/online": "0\\n",
        "sys/class/power_supply/BAT0/type": "Battery\\n",
        "sys/class/power_supply/BAT0/status": "Discharging\\n",
        "sys/class/power_supply/BAT0/capacity": "90\\n",
        "sys/class/thermal/thermal_zone0/temp": "40000\\n",
    }.items():
        (fs / path).parent.mkdir(parents=True, exist_ok=True)
        (fs / path).write_text(text)
    config = AgentConfig(
        broker=BrokerConfig("mqtt://127.0.0.1:1"),
        fleet="farm",
        device_id="pi-1",
        data=DataConfig(kind=DataKind.NPZ, path=tmp / "unused.npz"),
        probes=ProbeConfig(root=fs, metered=MeteredSource.NO, throttle=False, interval_s=1.0),
        eligibility=EligibilityPolicy(),
        state_dir=tmp / "state",
    )
    rng = np.random.default_rng(0)
    x = rng.random((50, 64), dtype=np.float32)
    dataset = LocalDataset.split(x, rng.integers(0, 10, 50), 0.2, seed=3)
    spec = get_model_spec("digits-mlp")
    broker = MemoryBroker()
    release = model_release("farm", 0, "digits-mlp", init_weights_numpy(spec, 0))
    for topic, payload in release.messages:
        broker.publish(topic, payload, 1, True)

    async def main() -> None:
        agent = DeviceAgent(
            config,
            dataset=dataset,
            transport_factory=lambda will, on_connect: MemoryTransport(
                broker, "pi-1", will=will, on_connect=on_connect
            ),
        )
        run = asyncio.create_task(agent.run())
        async with asyncio.timeout(30):
            while True:
                s = agent.statistics()
                if s.model_version == 0 and not s.eligible and s.reasons:
                    break
                await asyncio.sleep(0.02)
        agent.stop()
        await run
        s = agent.statistics()
        print("model", s.model_version, "reasons", ",".join(s.reasons))
        print("trainings", s.training.started)

    asyncio.run(main())
    print("torch loaded" if "torch" in sys.modules else "torch not loaded")
    """
)


def test_an_idle_agent_with_a_model_never_imports_torch(tmp_path: Path) -> None:
    # Act
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("model 0 reasons ")
    assert "on_battery" in lines[0]
    assert lines[1] == "trainings 0"
    assert lines[-1] == "torch not loaded"
