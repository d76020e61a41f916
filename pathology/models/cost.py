"""What one model costs: parameters, MACs, and the latency and throughput of its fastest inference path.

Library functions behind ``pathology model-info``, the study's per-cell throughput and the
benchmarks. Speed is measured through :func:`~pathology.models.optimize_for_inference`, the
path inference takes, so the figures are what a cohort run gets on this machine.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pathology.models.runtime import optimize_for_inference

__all__ = ["FLOPS_PER_MAC", "ModelInfo", "count_macs", "measure", "median_seconds"]

FLOPS_PER_MAC = 2
WARMUP_RUNS = 1


@dataclass(frozen=True)
class ModelInfo:
    """Size and speed of one model at one input size (speed of its optimised inference form).

    Attributes:
        params: number of parameters.
        macs: multiply-accumulates of one image's forward pass.
        latency_ms: median wall time of a batch of 1, in milliseconds.
        throughput: images per second at ``batch_size`` (from the median time of a batch).
        batch_size: batch used for ``throughput``.
        backend: what ran the model and at which precision (``runner.label`` of
            :func:`~pathology.models.optimize_for_inference`, e.g. ``openvino bf16-mixed``).
    """

    params: int
    macs: int
    latency_ms: float
    throughput: float
    batch_size: int
    backend: str


def median_seconds(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Median wall time in seconds of ``run(x)`` under ``inference_mode``, after a warm-up call."""
    with torch.inference_mode():
        for _ in range(WARMUP_RUNS):
            run(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(x)
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


def measure(model: nn.Module, img_size: tuple[int, int], *, backend: str = "auto", precision: str = "auto",
            batch_size: int = 32, repeats: int = 5, cache_dir: str | Path | None = None) -> ModelInfo:
    """Counts parameters and MACs of ``model``; times it through :func:`~pathology.models.optimize_for_inference`.

    Args:
        model: the model to describe (left unchanged).
        img_size: input ``(H, W)`` in px.
        backend: ``"auto"`` (the fastest installed for the model's device), ``"torch"``, ``"onnxruntime"``
            or ``"openvino"``.
        precision: ``"auto"``, ``"32-true"``, ``"bf16-mixed"`` (see :func:`~pathology.models.optimize_for_inference`).
        batch_size: images per batch for the throughput measurement.
        repeats: timed runs per measurement (the median is kept), after one warm-up run.
        cache_dir: where a runtime backend's exported graph is kept (pass the checkpoint's folder, so
            inference and timing export once); None: the user cache.

    Returns:
        The :class:`ModelInfo`.

    Raises:
        ValueError, UnsupportedRun, BackendUnavailable, ExportError: see
            :func:`~pathology.models.optimize_for_inference`.
    """
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, img_size)
    runner = optimize_for_inference(model, backend=backend, precision=precision, img_size=img_size, cache_dir=cache_dir)
    batch = torch.randn(batch_size, 3, *img_size, generator=torch.Generator().manual_seed(0)).to(runner.device)
    latency = median_seconds(runner, batch[:1], repeats)
    throughput = batch_size / median_seconds(runner, batch, repeats)
    return ModelInfo(params, macs, latency * 1e3, throughput, batch_size, runner.label)
