"""CPU speed of every inference backend of our EfficientFormer against timm's, in one process.

One table at 224 px: timm's ``efficientformer_l1`` eager (the baseline), ONNX Runtime on timm's
L1 exported to ONNX (the best a user gets without this toolkit; and OpenVINO at bf16 on the same
graph where the CPU has bf16 units), and our L1 ``{32: 1}`` eager and through every backend
and precision of :func:`pathology.models.optimize_for_inference` (``torch`` fused, with and
without ``torch.compile``, ``onnxruntime``, ``openvino``; ``bf16-mixed`` rows where the CPU has
AMX or AVX512-BF16), in images/s at ``--batch-size`` and ms at batch 1. The measured matmul peaks (a 2048²
``torch.matmul`` in fp32 and in bf16) give each model's FLOP limit, ``peak / (2 × MACs per
image)`` img/s, and each figure's fraction of it. Goals for the default (``auto``) path: ≥ 1.0×
ONNX Runtime on timm's L1, ≥ 4× timm eager, ≥ 0.6 of the (fp32) FLOP limit (the ratios printed
under the table; all from this one run).

A second table: what attention at /16 costs, ``{32: 1}`` against ``{16: 2, 32: 1}`` through the
default backend at every ``--sizes`` px (timm's L1 cannot run other than 224 px).

All runners are built first (ONNX graphs exported into ``--cache-dir``), then timed in
interleaved rounds (one call of each per round), each keeping its fastest call: on a shared CPU
the minimum is the figure least inflated by other processes, and interleaving exposes every
runner to the same load.

Usage::

    python benchmarks/bench_model.py                                  # the full tables, batch 32
    python benchmarks/bench_model.py --batch-size 2 --rounds 1 --sizes 224 --skip-compile   # smoke test
    python benchmarks/bench_model.py --clock cpu     # 1 thread, process CPU time: a machine others use
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from tqdm import tqdm

from pathology.atomic import atomic_path
from pathology.models import create_model, optimize_for_inference
from pathology.models.cost import count_macs
from pathology.models.runtime import (
    BACKENDS,
    BF16,
    FP32,
    UnsupportedRun,
    choose_backend,
    has_bf16_hardware,
    runner_label,
)

BASELINE_SIZE = 224
MATMUL_N = 2048  # edge of the square fp32 matmul that measures the peak
MATMUL_RUNS = 5
FLOPS_PER_MAC = 2
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
WARMUP_CALLS = 2  # oneDNN and the runtimes build their kernels for each new input shape on the first call
GOALS = {"× ONNX Runtime on timm L1": 1.0, "× timm eager": 4.0, "fraction of FLOP limit": 0.6}


@dataclass(frozen=True)
class Row:
    """One timed runner: a label, the backend (with its precision below fp32), the input edge in px,
    MACs per image, the callable, and its precision."""

    label: str
    backend: str
    img_size: int
    macs: int
    run: Callable[[torch.Tensor], torch.Tensor]
    precision: str = FP32


def _eager(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return run


def _ours(mhsa: dict[int, int], size: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model("efficientformer_l1", mhsa_blocks=mhsa, img_size=size).eval()


def main_rows(cache_dir: Path, compile_model: bool) -> list[Row]:
    """Table 1: the baselines, then our L1 eager and through every installed backend, at 224 px."""
    timm_l1 = timm.create_model("efficientformer_l1").eval()
    timm_macs = count_macs(timm_l1, (BASELINE_SIZE, BASELINE_SIZE))
    ours = _ours({32: 1}, BASELINE_SIZE)
    macs = count_macs(ours, (BASELINE_SIZE, BASELINE_SIZE))
    precisions = (FP32, BF16) if has_bf16_hardware(torch.device("cpu")) else (FP32,)
    rows = [Row("timm efficientformer_l1 eager", "torch eager", BASELINE_SIZE, timm_macs, _eager(timm_l1)),
            _row("timm efficientformer_l1 → ONNX", timm_l1, timm_macs, "onnxruntime", FP32, cache_dir)]
    if BF16 in precisions:
        rows.append(_row("timm efficientformer_l1 → ONNX", timm_l1, timm_macs, "openvino", BF16, cache_dir))
    rows.append(Row("ours L1 {32: 1} eager", "torch eager", BASELINE_SIZE, macs, _eager(ours)))
    for backend in BACKENDS:
        for precision in precisions:
            rows.append(_row("ours L1 {32: 1}", ours, macs, backend, precision, cache_dir))
            if backend == "torch" and compile_model:
                rows.append(_row("ours L1 {32: 1}", ours, macs, backend, precision, cache_dir, compile_model=True))
    return [row for row in rows if row is not None]


def _row(label: str, model: nn.Module, macs: int, backend: str, precision: str, cache_dir: Path,
         compile_model: bool = False) -> Row | None:
    """The model through one backend at one precision at 224 px; None (said) where it cannot run here."""
    try:
        runner = optimize_for_inference(model, backend=backend, precision=precision, cache_dir=cache_dir,
                                        compile_model=compile_model)
    except (ImportError, UnsupportedRun) as err:
        print(f"skipping {backend} {precision}: {err}")
        return None
    name = runner.label.replace("torch", "torch + compile") if compile_model else runner.label
    return Row(label, name, BASELINE_SIZE, macs, runner, precision)


def attention_rows(sizes: list[int], cache_dir: Path) -> list[Row]:
    """Table 2: ``{32: 1}`` and ``{16: 2, 32: 1}`` through the default backend at every size."""
    rows = []
    for size in sizes:
        for mhsa in ({32: 1}, {16: 2, 32: 1}):
            model = _ours(mhsa, size)
            runner = optimize_for_inference(model, cache_dir=cache_dir)
            rows.append(Row(f"ours L1 {mhsa}", runner.label, size, count_macs(model, (size, size)), runner,
                            runner.precision))
    return rows


def fastest_times(rows: list[Row], batch_size: int, rounds: int, clock: Callable[[], float]) -> list[float]:
    """Fastest of ``rounds`` interleaved calls of each row on a ``batch_size`` batch, in ``clock`` seconds."""
    inputs = [torch.randn(batch_size, 3, row.img_size, row.img_size) for row in rows]
    for row, x in zip(rows, inputs):
        for _ in range(WARMUP_CALLS):
            row.run(x)
    best = [float("inf")] * len(rows)
    for _ in tqdm(range(rounds), desc=f"rounds at batch {batch_size}"):
        for i, (row, x) in enumerate(zip(rows, inputs)):
            start = clock()
            row.run(x)
            best[i] = min(best[i], clock() - start)
    return best


def matmul_peak_flops(clock: Callable[[], float], dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the fastest of a few ``MATMUL_N``² matmuls in ``dtype`` with torch's current threads."""
    a, b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype), torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(MATMUL_RUNS):
        start = clock()
        torch.matmul(a, b)
        best = min(best, clock() - start)
    return 2 * MATMUL_N**3 / best


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def format_main(rows: list[Row], latency: list[float], rate: list[float], peaks: dict[str, float],
                default: str) -> str:
    """Table 1 and the goal ratios; ratios are to rows 0 (timm eager) and 1 (ONNX Runtime on timm's L1).

    ``peaks``: matmul FLOP/s per precision; each row's FLOP limit is that of the fp32 peak (the
    goal's) and, for bf16 rows, also of the bf16 peak, which is the hardware's limit for them.
    """
    lines = ["| model | backend | latency b=1 (ms) | img/s | × timm eager | × ONNX Runtime on timm L1 | "
             "fp32 FLOP limit (img/s) | fraction of fp32 FLOP limit | fraction of bf16 FLOP limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, seconds, images_per_s in zip(rows, latency, rate):
        limit = peaks[FP32] / (FLOPS_PER_MAC * row.macs)
        own = f"{images_per_s * FLOPS_PER_MAC * row.macs / peaks[BF16]:.2f}" if row.precision == BF16 else "—"
        backend = f"**{row.backend}** (default)" if row.backend == default and row.label.startswith("ours") \
            else row.backend
        lines.append(f"| {row.label} | {backend} | {seconds * 1e3:.1f} | {images_per_s:.1f} | "
                     f"{images_per_s / rate[0]:.2f} | {images_per_s / rate[1]:.2f} | {limit:.1f} | "
                     f"{images_per_s / limit:.2f} | {own} |")
    i = next(i for i, row in enumerate(rows) if row.backend == default and row.label.startswith("ours"))
    achieved = {"× ONNX Runtime on timm L1": rate[i] / rate[1], "× timm eager": rate[i] / rate[0],
                "fraction of FLOP limit": rate[i] * FLOPS_PER_MAC * rows[i].macs / peaks[FP32]}
    lines.append("")
    lines += [f"default ({default}): {value:.2f} {name} (goal ≥ {GOALS[name]}: {'met' if value >= GOALS[name] else 'NOT met'})"
              for name, value in achieved.items()]
    if rows[i].precision == BF16:
        lines.append(f"default ({default}): {rate[i] * FLOPS_PER_MAC * rows[i].macs / peaks[BF16]:.2f} of the bf16 "
                     "FLOP limit (its precision's own; no goal set)")
    return "\n".join(lines)


def format_attention(rows: list[Row], latency: list[float], rate: list[float]) -> str:
    """Table 2: per size, both placements and the time ratio ``{16: 2, 32: 1}`` / ``{32: 1}`` at the batch."""
    lines = ["| input px | backend | GMACs {32: 1} | GMACs {16: 2, 32: 1} | img/s {32: 1} | img/s {16: 2, 32: 1} | "
             "latency b=1 ms {32: 1} / {16: 2, 32: 1} | time ratio |", "|---|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        one, two = rows[i], rows[i + 1]
        lines.append(f"| {one.img_size} | {one.backend} | {one.macs / 1e9:.2f} | {two.macs / 1e9:.2f} | "
                     f"{rate[i]:.1f} | {rate[i + 1]:.1f} | {latency[i] * 1e3:.1f} / {latency[i + 1] * 1e3:.1f} | "
                     f"{rate[i] / rate[i + 1]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Builds every runner, times them, prints (and optionally writes) the two Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8, help="timed calls per figure (fastest kept)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 512], help="px, for the attention table")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time with 1 thread everywhere, which "
                             "other processes on a shared machine barely disturb")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row (slow to build)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="ONNX graphs (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here (Markdown)")
    args = parser.parse_args(argv)
    if args.threads or args.clock == "cpu":
        torch.set_num_threads(1 if args.clock == "cpu" else args.threads)
    clock = CLOCKS[args.clock]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = args.cache_dir or Path(scratch)
        main_table = main_rows(cache_dir, compile_model=not args.skip_compile)
        attention = attention_rows(args.sizes, cache_dir)
        rows = main_table + attention
        latency = fastest_times(rows, 1, args.rounds, clock)
        rate = [args.batch_size / t for t in fastest_times(rows, args.batch_size, args.rounds, clock)]
    peaks = {FP32: matmul_peak_flops(clock), BF16: matmul_peak_flops(clock, torch.bfloat16)}
    default = runner_label(*choose_backend("auto", torch.device("cpu")))
    n = len(main_table)
    header = (f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores), {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, timm {timm.__version__}; img/s at batch {args.batch_size}, latency at "
              f"batch 1; fastest of {args.rounds} interleaved rounds; {args.clock} clock; matmul peak "
              f"{peaks[FP32] / 1e9:.0f} GFLOP/s fp32, {peaks[BF16] / 1e9:.0f} bf16 ({MATMUL_N}² torch.matmul; "
              f"bf16 units (AMX or AVX512-BF16): {'yes' if has_bf16_hardware(torch.device('cpu')) else 'no'}); "
              f"load average before the run "
              f"{load_before:.1f}")
    text = "\n\n".join([header, format_main(main_table, latency[:n], rate[:n], peaks, default),
                        "Attention at /16:", format_attention(attention, latency[n:], rate[n:])])
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
