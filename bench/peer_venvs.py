"""Cached virtual environments for the peer simulators that ``bench/vs_peers.py`` runs.

Each peer gets its own venv under ``~/.cache/edgefl-bench/`` (``$EDGEFL_BENCH_CACHE`` overrides)
holding this project's torch pin and the peer's pinned release, installed from the package
registry with the ordinary ``pip`` client. A venv is reused when its stamp file lists exactly
the requirements asked for; otherwise it is rebuilt. Peers never become edgefl dependencies.

    python bench/peer_venvs.py          # create (or check) both venvs and print their paths
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

TORCH_PIN = "torch==2.13.0"
PEERS: dict[str, tuple[str, ...]] = {
    "flower": (TORCH_PIN, "flwr[simulation]==1.40.0"),
    "pfl": (TORCH_PIN, "pfl==0.6.0"),
}
_STAMP = ".edgefl-bench-requirements"


def cache_root() -> Path:
    """Where the venvs live: ``$EDGEFL_BENCH_CACHE`` or ``~/.cache/edgefl-bench``."""
    env = os.environ.get("EDGEFL_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgefl-bench"


def venv_python(peer: str) -> Path:
    """The venv's interpreter for ``peer`` (creating or rebuilding the venv when needed)."""
    reqs = PEERS[peer]
    tag = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:10]
    root = cache_root() / f"{peer}-{tag}"
    python = root / "bin" / "python"
    stamp = root / _STAMP
    want = "\n".join(reqs) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"[venv] creating {root} with {' '.join(reqs)} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *reqs],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    stamp.write_text(want)
    return python


def main() -> int:
    for peer in PEERS:
        print(peer, venv_python(peer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
