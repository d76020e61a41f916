"""``pathology model-info``: parameters, MACs and measured CPU latency/throughput of a model.

Example::

    pathology model-info efficientformer_l1 --mhsa-blocks 16:2,32:1 --img-size 512
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pathology.models.efficientformer import create_model, list_models
from pathology.models.mhsa import MhsaBlocks
from pathology.models.optimize import optimize_for_inference

__all__ = ["ModelInfo", "count_macs", "main", "measure", "median_seconds"]

FLOPS_PER_MAC = 2
WARMUP_RUNS = 1


@dataclass(frozen=True)
class ModelInfo:
    """Size and speed of one model at one input size (speed of its optimised eval form).

    Attributes:
        params: number of parameters.
        macs: multiply-accumulates of one image's forward pass.
        latency_ms: median wall time of a batch of 1, in milliseconds.
        throughput: images per second at ``batch_size``.
        batch_size: batch used for ``throughput``.
    """

    params: int
    macs: int
    latency_ms: float
    throughput: float
    batch_size: int


def median_seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time in seconds of ``model(x)`` under ``inference_mode``, after a warm-up run."""
    with torch.inference_mode():
        for _ in range(WARMUP_RUNS):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def count_macs(model: nn.Module, img_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one ``(H, W)`` image through ``model`` (convolutions and matmuls)."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    with counter, torch.inference_mode():
        model.eval()(torch.zeros(1, 3, *img_size))
    model.train(was_training)
    return counter.get_total_flops() // FLOPS_PER_MAC


def measure(model: nn.Module, img_size: tuple[int, int], *, batch_size: int = 32, repeats: int = 5) -> ModelInfo:
    """Counts parameters and MACs of ``model``; times its :func:`optimize_for_inference` form on CPU.

    Args:
        model: the model to describe (left unchanged).
        img_size: input ``(H, W)`` in px.
        batch_size: images per batch for the throughput measurement.
        repeats: timed runs per measurement (the median is kept), after one warm-up run.

    Returns:
        The :class:`ModelInfo`.
    """
    params = sum(p.numel() for p in model.parameters())
    fast = optimize_for_inference(model)
    macs = count_macs(fast, img_size)
    batch = torch.randn(batch_size, 3, *img_size)
    latency = median_seconds(fast, batch[:1], repeats)
    throughput = batch_size / median_seconds(fast, batch, repeats)
    return ModelInfo(params, macs, latency * 1e3, throughput, batch_size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathology model-info", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=list_models())
    parser.add_argument("--mhsa-blocks", default=None, help="STRIDE:COUNT,... e.g. 16:2,32:1 (default: the paper's)")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], help="H [W] in px, multiples of 32")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="batch for throughput")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


def main(argv: list[str]) -> int:
    """Prints size and speed of one model; returns 0, or 2 on bad arguments."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        mhsa = None if args.mhsa_blocks is None else MhsaBlocks.parse(args.mhsa_blocks)
        size = (args.img_size[0], args.img_size[-1])
        model = create_model(args.name, mhsa_blocks=mhsa, num_classes=args.num_classes, img_size=size)
    except ValueError as err:
        print(f"pathology model-info: {err}", file=sys.stderr)
        return 2
    info = measure(model, size, batch_size=args.batch_size, repeats=args.repeats)
    print(f"model       {args.name}  mhsa_blocks={model.mhsa_blocks}  input {size[0]}x{size[1]} px")
    print(f"parameters  {info.params / 1e6:.2f} M")
    print(f"MACs        {info.macs / 1e9:.3f} G per image")
    print(f"latency     {info.latency_ms:.1f} ms (batch 1, CPU, {torch.get_num_threads()} threads)")
    print(f"throughput  {info.throughput:.1f} img/s (batch {info.batch_size})")
    return 0
