"""The edgefl device agent: the daemon that runs on each device (``edgefl agent``).

Module map (torch is imported only by ``trainer.TorchTrainer.train``, when a training starts):

* ``agent`` — :class:`~device_agent.agent.DeviceAgent`, the asyncio shell (connection and
  presence sessions, model follow, scheduler, spool sender, systemd watchdog);
* ``config`` — TOML < environment < flags, validated (``load_config``);
* ``eligibility`` — probes under a configurable root and the pure policy with hysteresis;
  ``snapshots`` — the ``SnapshotSource`` seam;
* ``trainer`` — ``Trainer`` protocol, ``TrainJob``/``TrainResult``, ``TorchTrainer``,
  ``ProcessTrainer``; ``dataset`` — local data and its held-out split;
* ``fetch`` / ``model_store`` — fetching, verifying and atomically swapping model versions;
* ``updates`` — codec choice, encoding, signing; ``spool`` — crash-safe update spool and the
  residual store; ``persist`` — session and trained-version counters;
* ``predict`` — onnxruntime inference on the held model; ``cli`` — ``agent_app`` (typer);
* ``notify`` — sd_notify; ``release`` — builds a model version's retained messages (tests,
  benchmarks, agent-only simulations).

Operator's guide: ``docs/OPERATIONS.md``.
"""
