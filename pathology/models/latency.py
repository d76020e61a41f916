"""Where the time of one forward pass goes, block by block and per activation, on this machine.

The paper chose every EfficientFormer operator by its measured latency; this module lets users
ask the same of their hardware: what do the stem, each pooling block, each downsample, the MHSA
blocks at /16 and /32, the head, and the GELUs (or another ``act_layer``) cost here, eager and in
the fused torch form, next to their MACs and parameters, so one sees where FLOPs and time part.

Timing uses a timeline: a forward hook stamps the clock when each block finishes, and a block's
time is the gap since the previous stamp (the stem's since the call, the head's until the
return), so the blocks partition the whole call and their shares sum to 1. Activations are timed
by pre/post hooks around every activation module (they lie inside the blocks). ONNX Runtime and
OpenVINO run a graph without module boundaries, so for them only the whole call is timed.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pathology.atomic import atomic_path
from pathology.models.cost import FLOPS_PER_MAC, WARMUP_RUNS, median_seconds
from pathology.models.efficientformer import ACT_LAYERS, STAGE_STRIDES, resolve_act_layer
from pathology.models.optimize import fuse_for_inference
from pathology.models.runtime import optimize_for_inference

__all__ = ["BlockTime", "LatencyReport", "format_table", "measure_latency", "write_json"]

HEAD = "head"


@dataclass(frozen=True)
class BlockTime:
    """One block of the model: what it computes and what it costs at batch 1.

    Attributes:
        name: ``stem``, ``stages.S.downsample``, ``stages.S.blocks.B`` or ``head`` (norm, pooling, classifiers).
        kind: ``stem``, ``downsample``, ``pool``, ``mhsa`` or ``head``.
        stride: output stride of the block (input px per output pixel or token).
        params: parameters.
        macs: multiply-accumulates of one image.
        eager_ms, optimised_ms: median time in ms, eager model and fused torch form.
        eager_share, optimised_share: fraction of the whole forward pass.
    """

    name: str
    kind: str
    stride: int
    params: int
    macs: int
    eager_ms: float
    eager_share: float
    optimised_ms: float
    optimised_share: float


@dataclass(frozen=True)
class LatencyReport:
    """Per-block and per-activation times of one model at batch 1; times are medians in ms.

    Attributes:
        img_size: input ``(H, W)`` in px.
        threads: torch CPU threads.
        blocks: every block in forward order.
        activations: activation name -> (eager ms, eager share, optimised ms, optimised share),
            summed over every activation module of the model.
        eager_ms, optimised_ms: the whole forward pass, eager and fused torch form.
        backend: the backend (and precision below fp32) :func:`~pathology.models.optimize_for_inference`
            chose or was told, e.g. ``openvino bf16-mixed``.
        backend_ms: the whole call through that backend.
    """

    img_size: tuple[int, int]
    threads: int
    blocks: list[BlockTime]
    activations: dict[str, tuple[float, float, float, float]]
    eager_ms: float
    optimised_ms: float
    backend: str
    backend_ms: float


def _units(model: nn.Module) -> list[tuple[str, str, int, nn.Module]]:
    """(name, kind, stride, module) of every timed block in forward order, the head excluded."""
    units = [("stem", "stem", STAGE_STRIDES[0], model.stem)]
    for s, (stage, stride) in enumerate(zip(model.stages, STAGE_STRIDES)):
        if not isinstance(stage.downsample, nn.Identity):
            units.append((f"stages.{s}.downsample", "downsample", stride, stage.downsample))
        for b, block in enumerate(stage.blocks):
            kind = "mhsa" if b >= stage.n_pool else "pool"
            units.append((f"stages.{s}.blocks.{b}", kind, stride, block))
    return units


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _ActivationClock:
    """Sums the time spent inside activation modules, per activation name (they never nest)."""

    def __init__(self, names: list[str]) -> None:
        self.seconds = dict.fromkeys(names, 0.0)
        self._start = 0.0

    def start(self, *_: object) -> None:
        self._start = time.perf_counter()

    def stop(self, name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            self.seconds[name] += time.perf_counter() - self._start
        return hook


def _time_once(model: nn.Module, x: torch.Tensor, activations: dict[str, type[nn.Module]]
               ) -> tuple[list[float], dict[str, float], float]:
    """One timed call: (seconds of each unit then the head, seconds per activation name, total)."""
    stamps: list[float] = []
    clock = _ActivationClock(list(activations))
    handles = [module.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
               for *_, module in _units(model)]
    for module in model.modules():
        for name, kind in activations.items():
            if type(module) is kind:
                handles += [module.register_forward_pre_hook(clock.start),
                            module.register_forward_hook(clock.stop(name))]
    with _hooks(handles), torch.inference_mode():
        start = time.perf_counter()
        model(x)
        end = time.perf_counter()
    times = [b - a for a, b in zip([start, *stamps], [*stamps, end])]
    return times, clock.seconds, end - start


def _median_times(model: nn.Module, x: torch.Tensor, activations: dict[str, type[nn.Module]], repeats: int
                  ) -> tuple[list[float], dict[str, float], float]:
    for _ in range(WARMUP_RUNS):
        _time_once(model, x, activations)
    runs = [_time_once(model, x, activations) for _ in range(repeats)]
    units = [median(run[0][i] for run in runs) for i in range(len(runs[0][0]))]
    acts = {name: median(run[1][name] for run in runs) for name in activations}
    return units, acts, median(run[2] for run in runs)


def _macs(model: nn.Module, x: torch.Tensor) -> list[int]:
    """MACs of each unit, then of the head (the whole minus the units), for the input ``x``."""
    inputs: dict[str, tuple[torch.Tensor, ...]] = {}
    units = _units(model)
    handles = [module.register_forward_pre_hook(lambda _, args, name=name: inputs.__setitem__(name, args))
               for name, _, _, module in units]
    total = FlopCounterMode(display=False)
    with _hooks(handles), torch.inference_mode(), total:
        model(x)
    macs = []
    for name, _, _, module in units:
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            module(*inputs[name])
        macs.append(counter.get_total_flops() // FLOPS_PER_MAC)
    return [*macs, total.get_total_flops() // FLOPS_PER_MAC - sum(macs)]


def _params(model: nn.Module) -> list[int]:
    units = [sum(p.numel() for p in module.parameters()) for *_, module in _units(model)]
    return [*units, sum(p.numel() for p in model.parameters()) - sum(units)]


def measure_latency(model: nn.Module, img_size: tuple[int, int], *, backend: str = "auto", precision: str = "auto",
                    repeats: int = 5, cache_dir: str | Path | None = None) -> LatencyReport:
    """Times every block and activation of ``model`` (left unchanged) at batch 1 on the CPU.

    Args:
        model: an EfficientFormer from :func:`~pathology.models.create_model`.
        img_size: input ``(H, W)`` in px (the size the model was built for).
        backend, precision: whose whole-call time to add (see :func:`~pathology.models.optimize_for_inference`).
        repeats: timed calls per figure (medians kept), after one warm-up call.
        cache_dir: where a runtime backend's exported graph is cached.

    Returns:
        The :class:`LatencyReport`.
    """
    was_training = model.training
    model.eval()
    fused = fuse_for_inference(model)
    x = torch.randn(1, 3, *img_size, generator=torch.Generator().manual_seed(0))
    activations = {name: resolve_act_layer(name) for name in ACT_LAYERS
                   if any(type(m) is resolve_act_layer(name) for m in model.modules())}
    eager_units, eager_acts, eager_total = _median_times(model, x, activations, repeats)
    fused_units, fused_acts, fused_total = _median_times(fused, x, activations, repeats)
    runner = optimize_for_inference(model, backend=backend, precision=precision, img_size=img_size, cache_dir=cache_dir)
    backend_seconds = median_seconds(runner, x, repeats)
    names = [(name, kind, stride) for name, kind, stride, _ in _units(model)] + [(HEAD, HEAD, STAGE_STRIDES[-1])]
    # shares of the sum of the blocks' medians, so they sum to 1 (the median of the whole differs slightly)
    eager_sum, fused_sum = sum(eager_units), sum(fused_units)
    blocks = [BlockTime(name, kind, stride, params, macs, e * 1e3, e / eager_sum, f * 1e3, f / fused_sum)
              for (name, kind, stride), params, macs, e, f in
              zip(names, _params(model), _macs(model, x), eager_units, fused_units)]
    acts = {name: (eager_acts[name] * 1e3, eager_acts[name] / eager_sum,
                   fused_acts[name] * 1e3, fused_acts[name] / fused_sum) for name in activations}
    model.train(was_training)
    return LatencyReport(img_size, torch.get_num_threads(), blocks, acts, eager_total * 1e3, fused_total * 1e3,
                         runner.label, backend_seconds * 1e3)


def write_json(report: LatencyReport, path: str | Path) -> Path:
    """Writes the report as JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return Path(path)


def format_table(report: LatencyReport) -> str:
    """The report as a plain-text table (one row per block, then one per activation)."""
    lines = [f"{'block':<22} {'kind':<10} {'stride':>6} {'params':>9} {'MMACs':>9} {'eager ms':>9} {'share':>6} "
             f"{'fused ms':>9} {'share':>6}"]
    for b in report.blocks:
        lines.append(f"{b.name:<22} {b.kind:<10} {b.stride:>6} {b.params:>9} {b.macs / 1e6:>9.2f} {b.eager_ms:>9.2f} "
                     f"{b.eager_share:>6.1%} {b.optimised_ms:>9.2f} {b.optimised_share:>6.1%}")
    for name, (e_ms, e_share, f_ms, f_share) in report.activations.items():
        lines.append(f"{'activation ' + name:<22} {'act':<10} {'all':>6} {0:>9} {'–':>9} {e_ms:>9.2f} {e_share:>6.1%} "
                     f"{f_ms:>9.2f} {f_share:>6.1%}")
    lines.append(f"{'whole model':<22} {'':<10} {'':>6} {sum(b.params for b in report.blocks):>9} "
                 f"{sum(b.macs for b in report.blocks) / 1e6:>9.2f} {report.eager_ms:>9.2f} {'100%':>6} "
                 f"{report.optimised_ms:>9.2f} {'100%':>6}")
    lines.append(f"backend {report.backend}: {report.backend_ms:.2f} ms for the whole call "
                 f"(batch 1, {report.threads} threads, {report.img_size[0]}x{report.img_size[1]} px)")
    return "\n".join(lines)
