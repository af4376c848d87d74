"""Update codec benchmark: bytes versus fp32 and single-core throughput, memcpy side by side.

Run: ``.venv/bin/python bench/codec.py [--json] [--quick]``

Inputs:

* **real**: the delta of the 4,298-parameter mnist1d 1-D CNN (docs: DESIGN.md "Calibration")
  after a few SGD steps on ``mnist1d`` data generated offline. Compression ratios are measured
  on this delta as is.
* **real×N**: the same delta repeated to about 1M parameters for throughput; every copy is
  randomly permuted so that zstd cannot simply find the repeats (that would flatter fp32/fp16).
* **heavy**: 1M parameters of Student-t (3 degrees of freedom) noise, a heavy-tailed update.

Throughput is GB/s of fp32 input (``4 · num_params`` bytes per second), best of N runs with
``time.perf_counter``, on one core (all BLAS/OpenMP pools are set to one thread before numpy is
imported). ``encode`` is :func:`edgefl.codec.encode_update`; ``decode+acc`` is
:func:`edgefl.codec.open_update` (bounded decompression and validation) followed by
``DecodedUpdate.add_to(accumulator, weight)``. ``memcpy`` is ``np.copyto`` of the same 1M
float32 vector (4 MiB, cache-resident on most CPUs), measured in the same run, so ratios to it
are comparable across machines; a 64 MiB (DRAM-bound) copy is printed for context.

With ``--json`` the last line of stdout is one JSON object (keys ``encode_int8_gbps``,
``decode_accumulate_int8_gbps``, ``memcpy_gbps``, ``ratio_int8``, ``ratio_int4``,
``ratio_topk1_int8``, ... ; ratios on the real delta, body bytes only, plus ``*_with_header``
and ``relerr_*``, the relative L2 error of one send of the real delta without error feedback).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

from edgefl.codec import (  # noqa: E402
    CodecConfig,
    Quantization,
    decode_update,
    encode_update,
    open_update,
)

CODECS: dict[str, CodecConfig] = {
    "fp32": CodecConfig(Quantization.FP32),
    "fp16": CodecConfig(Quantization.FP16),
    "int8": CodecConfig(Quantization.INT8),
    "int4": CodecConfig(Quantization.INT4),
    "int2": CodecConfig(Quantization.INT2),
    "int4_b256": CodecConfig(Quantization.INT4, block_size=256),
    "int2_b256": CodecConfig(Quantization.INT2, block_size=256),
    "topk1_int8": CodecConfig(Quantization.INT8, topk_fraction=0.01),
    "topk1_int4": CodecConfig(Quantization.INT4, topk_fraction=0.01),
}
THROUGHPUT_PARAMS = 1 << 20
LARGE_COPY_PARAMS = 1 << 24
LIMIT = 1 << 30


def real_model_delta(*, num_samples: int, steps: int, seed: int = 0) -> NDArray[np.float32]:
    """Delta of the mnist1d CNN after ``steps`` SGD steps (``delta = after - before``)."""
    import torch
    from mnist1d.data import get_dataset_args, make_dataset
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)  # generated offline; never downloads
    x = torch.as_tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(data["y"], dtype=torch.long)
    model = nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(16, 16, 5, padding=2, stride=2),
        nn.ReLU(),
        nn.Conv1d(16, 16, 5, padding=2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(160, 10),
    )
    vector = nn.utils.parameters_to_vector
    before = vector(model.parameters()).detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, x.shape[0], (32,), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    after = vector(model.parameters()).detach().clone()
    delta: NDArray[np.float32] = (after - before).numpy().astype(np.float32)
    return delta


def tile_permuted(
    delta: NDArray[np.float32], size: int, rng: np.random.Generator
) -> NDArray[np.float32]:
    copies = -(-size // delta.size)
    tiled = np.concatenate([rng.permutation(delta) for _ in range(copies)])[:size]
    return np.ascontiguousarray(tiled, dtype=np.float32)


def heavy_tailed(size: int, rng: np.random.Generator) -> NDArray[np.float32]:
    return (rng.standard_t(3.0, size) * 1e-3).astype(np.float32)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memcpy_gbps(size: int, repeats: int) -> float:
    src = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    dst = np.empty_like(src)
    return 4 * size / best_of(lambda: np.copyto(dst, src), repeats * 5) / 1e9


@dataclass
class Row:
    codec: str
    ratio: float
    ratio_with_header: float
    encode_gbps: float
    decode_gbps: float


def measure(x: NDArray[np.float32], config: CodecConfig, repeats: int) -> Row:
    rng = np.random.default_rng(1)
    encoded, _ = encode_update(x, config, rng=rng)
    acc = np.zeros(x.size, dtype=np.float32)

    def decode() -> None:
        update = open_update(
            encoded.descriptor, encoded.body, num_params=x.size, max_decompressed=LIMIT
        )
        update.add_to(acc, 0.5)

    encode_s = best_of(lambda: encode_update(x, config, rng=rng), repeats)
    decode_s = best_of(decode, repeats)
    return Row(
        codec="",
        ratio=encoded.compression_ratio,
        ratio_with_header=encoded.dense_size / encoded.encoded_size,
        encode_gbps=4 * x.size / encode_s / 1e9,
        decode_gbps=4 * x.size / decode_s / 1e9,
    )


def ratios_only(x: NDArray[np.float32], config: CodecConfig) -> tuple[float, float, float]:
    """Body ratio, body+descriptor ratio, and relative L2 error ``‖x̂ - x‖ / ‖x‖`` of one send."""
    encoded, _ = encode_update(x, config, rng=np.random.default_rng(1))
    decoded = decode_update(
        encoded.descriptor, encoded.body, num_params=x.size, max_decompressed=LIMIT
    )
    error = float(np.linalg.norm(decoded.astype(np.float64) - x) / np.linalg.norm(x))
    return encoded.compression_ratio, encoded.dense_size / encoded.encoded_size, error


def print_tables(
    real_params: int,
    real_ratios: dict[str, tuple[float, float, float]],
    inputs: dict[str, dict[str, Row]],
    memcpy: float,
) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a core dependency
        Console = None  # type: ignore[assignment,misc]

    title = f"bytes vs fp32 on the real mnist1d CNN delta ({real_params} params)"
    header = ["codec", "ratio (body)", "ratio (body+descriptor)", "rel. L2 error (one send)"]
    rows = [[name, f"{r:.1f}x", f"{h:.1f}x", f"{e:.3f}"] for name, (r, h, e) in real_ratios.items()]
    tables = [(title, header, rows)]
    for label, results in inputs.items():
        header = ["codec", "ratio", "encode GB/s", "enc/memcpy", "decode+acc GB/s", "dec/memcpy"]
        rows = [
            [
                name,
                f"{row.ratio:.1f}x",
                f"{row.encode_gbps:.2f}",
                f"{row.encode_gbps / memcpy:.3f}",
                f"{row.decode_gbps:.2f}",
                f"{row.decode_gbps / memcpy:.3f}",
            ]
            for name, row in results.items()
        ]
        tables.append((f"{label}: one core, memcpy {memcpy:.1f} GB/s", header, rows))
    if Console is not None:
        console = Console(file=sys.stdout, width=110)
        for title, header, rows in tables:
            table = Table(title=title)
            for i, column in enumerate(header):
                table.add_column(column, justify="left" if i == 0 else "right")
            for row_cells in rows:
                table.add_row(*row_cells)
            console.print(table)
        return
    for title, header, rows in tables:  # pragma: no cover
        print(title)
        print("  ".join(f"{c:>16}" for c in header))
        for row_cells in rows:
            print("  ".join(f"{c:>16}" for c in row_cells))


def json_summary(
    num_params_real: int,
    memcpy: float,
    memcpy_large: float,
    real_ratios: dict[str, tuple[float, float, float]],
    results: dict[str, dict[str, Row]],
) -> dict[str, float | int]:
    """The ``--json`` line: every codec's ratio, error and speeds on both inputs."""
    real_label, heavy_label = list(results)
    summary: dict[str, float | int] = {
        "num_params_real": int(num_params_real),
        "num_params_throughput": THROUGHPUT_PARAMS,
        "memcpy_gbps": round(memcpy, 3),
        "memcpy_large_gbps": round(memcpy_large, 3),
    }
    for name in CODECS:
        ratio, with_header, error = real_ratios[name]
        summary[f"ratio_{name}"] = round(ratio, 3)
        summary[f"relerr_{name}"] = round(error, 4)
        summary[f"ratio_{name}_with_header"] = round(with_header, 3)
        summary[f"encode_{name}_gbps"] = round(results[real_label][name].encode_gbps, 3)
        summary[f"decode_accumulate_{name}_gbps"] = round(results[real_label][name].decode_gbps, 3)
        summary[f"heavy_ratio_{name}"] = round(results[heavy_label][name].ratio, 3)
        summary[f"heavy_encode_{name}_gbps"] = round(results[heavy_label][name].encode_gbps, 3)
        summary[f"heavy_decode_accumulate_{name}_gbps"] = round(
            results[heavy_label][name].decode_gbps, 3
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="last stdout line is a JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, less training")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 15

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    real = real_model_delta(
        num_samples=1000 if args.quick else 4000, steps=10 if args.quick else 30
    )
    train_s = time.perf_counter() - started
    memcpy = memcpy_gbps(THROUGHPUT_PARAMS, repeats)
    real_ratios = {name: ratios_only(real, config) for name, config in CODECS.items()}
    inputs = {
        f"real×{-(-THROUGHPUT_PARAMS // real.size)} ({THROUGHPUT_PARAMS} params)": tile_permuted(
            real, THROUGHPUT_PARAMS, rng
        ),
        f"heavy-tailed t(3) ({THROUGHPUT_PARAMS} params)": heavy_tailed(THROUGHPUT_PARAMS, rng),
    }
    results: dict[str, dict[str, Row]] = {}
    for label, x in inputs.items():
        results[label] = {}
        for name, config in CODECS.items():
            row = measure(x, config, repeats)
            row.codec = name
            results[label][name] = row
    memcpy = max(memcpy, memcpy_gbps(THROUGHPUT_PARAMS, repeats))  # best across the run
    memcpy_large = memcpy_gbps(LARGE_COPY_PARAMS, max(1, repeats // 5))

    print(
        f"real delta: {real.size} params, |delta|_2 = {float(np.linalg.norm(real)):.3g}, "
        f"trained in {train_s:.1f} s; repeats = {repeats}"
    )
    print(
        f"memcpy: {memcpy:.1f} GB/s for 4 MiB (cache-resident, the reference below), "
        f"{memcpy_large:.1f} GB/s for {4 * LARGE_COPY_PARAMS >> 20} MiB (DRAM)"
    )
    print_tables(real.size, real_ratios, results, memcpy)

    if args.json:
        print(
            json.dumps(
                json_summary(real.size, memcpy, memcpy_large, real_ratios, results), sort_keys=True
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
