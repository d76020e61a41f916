"""CPU throughput and latency of our EfficientFormer against timm's, measured in one process.

Every figure is also given as a ratio to timm's ``efficientformer_l1`` as it ships (eval mode,
``inference_mode``, NCHW input) at 224 px, measured in the same run. All models are built first,
then timed in interleaved rounds (one call of each model per round) and each keeps its fastest
call: on a shared CPU the minimum is the figure least inflated by other processes, and
interleaving exposes every model to the same load. Ours is
``fuse_for_inference(create_model(...))``. timm's L1 cannot run at 256 or 512 px (its
attention biases are fixed at 7 x 7); those rows show the error it raises.

Usage::

    python benchmarks/bench_model.py                       # the full table, batch 32
    python benchmarks/bench_model.py --batch-size 8 --rounds 3 --out table.md
    python benchmarks/bench_model.py --clock cpu     # on a machine other processes are using
"""
from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from tqdm import tqdm

from pathology.atomic import atomic_path
from pathology.models import create_model, fuse_for_inference

BASELINE_SIZE = 224
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
WARMUP_CALLS = 2  # oneDNN builds its kernels for each new input shape on the first call


@dataclass(frozen=True)
class Case:
    """One row: a label, how to build the model, and the input edge in px."""

    label: str
    build: Callable[[], nn.Module]
    img_size: int


def _timm(name: str, *, optimized: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = timm.create_model(name).eval()
        return fuse_for_inference(model) if optimized else model
    return build


def _ours(name: str, mhsa: dict[int, int] | None, size: int) -> Callable[[], nn.Module]:
    return lambda: fuse_for_inference(create_model(name, mhsa_blocks=mhsa, img_size=size))


def cases(sizes: list[int]) -> list[Case]:
    """The rows of the table, in print order (the baseline is measured separately)."""
    rows = [Case("timm efficientformer_l1 + our fuse_for_inference", _timm("efficientformer_l1", optimized=True),
                 BASELINE_SIZE),
            Case("ours L1 {32: 1}, eager (no optimize)",
                 lambda: create_model("efficientformer_l1", img_size=BASELINE_SIZE).eval(), BASELINE_SIZE)]
    for size in sizes:
        rows.append(Case("ours L1 {32: 1}", _ours("efficientformer_l1", {32: 1}, size), size))
        rows.append(Case("ours L1 {16: 2, 32: 1}", _ours("efficientformer_l1", {16: 2, 32: 1}, size), size))
    rows += [Case("ours L3 {32: 4}", _ours("efficientformer_l3", None, BASELINE_SIZE), BASELINE_SIZE),
             Case("ours L7 {32: 8}", _ours("efficientformer_l7", None, BASELINE_SIZE), BASELINE_SIZE),
             Case("timm resnet50", _timm("resnet50"), BASELINE_SIZE),
             Case("timm mobilenetv3_large_100", _timm("mobilenetv3_large_100"), BASELINE_SIZE)]
    return rows


def _seconds(model: nn.Module, x: torch.Tensor, clock: Callable[[], float]) -> float:
    start = clock()
    model(x)
    return clock() - start


def fastest_times(models: list[nn.Module], inputs: list[torch.Tensor], rounds: int,
                  clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Fastest of ``rounds`` interleaved calls ``models[i](inputs[i])``, in ``clock`` seconds, after warm-up."""
    best = [float("inf")] * len(models)
    with torch.inference_mode():
        for model, x in zip(models, inputs):
            for _ in range(WARMUP_CALLS):
                model(x)
        for _ in tqdm(range(rounds), desc="rounds"):
            for i, (model, x) in enumerate(zip(models, inputs)):
                best[i] = min(best[i], _seconds(model, x, clock))
    return best


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _timm_l1_outcome(size: int) -> str:
    """What timm's shipped L1 does with a ``size`` px input: "runs" or the error it raises."""
    try:
        with torch.inference_mode():
            timm.create_model("efficientformer_l1").eval()(torch.zeros(1, 3, size, size))
    except RuntimeError as err:
        return f"fails: {str(err).splitlines()[0][:60]}"
    return "runs"


def format_table(header: str, rows: list[Case], latency: list[float], throughput: list[float],
                 sizes: list[int]) -> str:
    """Markdown table; ratios are to ``rows[0]`` (timm's shipped L1 at 224 px)."""
    lines = [header, "", "| model | input px | latency b=1 (ms) | throughput (img/s) | "
             "× timm L1 (latency) | × timm L1 (throughput) |", "|---|---|---|---|---|---|"]
    for case, seconds, rate in zip(rows, latency, throughput):
        lines.append(f"| {case.label} | {case.img_size} | {seconds * 1e3:.1f} | {rate:.1f} | "
                     f"{latency[0] / seconds:.2f} | {rate / throughput[0]:.2f} |")
    for size in sizes:
        if size != BASELINE_SIZE:
            outcome = _timm_l1_outcome(size)
            lines.append(f"| timm efficientformer_l1 as shipped | {size} | {outcome} | – | – | – |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measures every row and prints (and optionally writes) a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8, help="timed calls per figure (fastest kept)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 512])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this thread's CPU time with 1 torch thread, which other "
                             "processes on a shared machine barely disturb")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    if args.threads or args.clock == "cpu":
        torch.set_num_threads(1 if args.clock == "cpu" else args.threads)
    torch.manual_seed(0)
    rows = [Case("timm efficientformer_l1 as shipped", _timm("efficientformer_l1"), BASELINE_SIZE),
            *cases(args.sizes)]
    models = [case.build() for case in tqdm(rows, desc="building")]
    singles = [torch.randn(1, 3, case.img_size, case.img_size) for case in rows]
    batches = [torch.randn(args.batch_size, 3, case.img_size, case.img_size) for case in rows]
    clock = CLOCKS[args.clock]
    latency = fastest_times(models, singles, args.rounds, clock)
    throughput = [args.batch_size / t for t in fastest_times(models, batches, args.rounds, clock)]
    header = (f"CPU: {_cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
              f"timm {timm.__version__}; latency at batch 1, throughput at batch {args.batch_size}; "
              f"fastest of {args.rounds} interleaved rounds; {args.clock} clock")
    table = format_table(header, rows, latency, throughput, args.sizes)
    print(table)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
