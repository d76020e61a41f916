"""``pathology model-info``: parameters, MACs and measured latency/throughput of a model.

A thin command over :func:`pathology.models.cost.measure` and
:func:`pathology.models.latency.measure_latency`; speed is timed through the backend inference uses.

Example::

    pathology model-info efficientformer_l1 --mhsa-blocks 16:2,32:1 --img-size 512
    pathology model-info efficientformer_l1 --act-layer hard_swish --latency --json l1_latency.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pathology.models.cost import measure
from pathology.models.efficientformer import ACT_LAYERS, create_model, list_models
from pathology.models.export import ExportError
from pathology.models.latency import format_table, measure_latency, write_json
from pathology.models.mhsa import MhsaBlocks
from pathology.models.runtime import BACKENDS, PRECISIONS, BackendUnavailable

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathology model-info", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=list_models())
    parser.add_argument("--mhsa-blocks", default=None, help="STRIDE:COUNT,... e.g. 16:2,32:1 (default: the paper's)")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], help="H [W] in px, multiples of 32")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="batch for throughput")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--act-layer", choices=ACT_LAYERS, default="gelu", help="the blocks' MLP activation")
    parser.add_argument("--latency", action="store_true",
                        help="also time every block and activation at batch 1, eager and fused")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="what runs the timed model, and with --latency the whole call (default: the fastest "
                             "installed, as inference uses)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="of the timed model: auto (bf16-mixed where the CPU has AMX or AVX512-BF16), 32-true, "
                             "bf16-mixed")
    parser.add_argument("--json", type=Path, default=None, help="with --latency: also write the table as JSON here")
    return parser


def main(argv: list[str]) -> int:
    """Prints size and speed of one model; returns 0, or 2 on bad arguments."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        mhsa = None if args.mhsa_blocks is None else MhsaBlocks.parse(args.mhsa_blocks)
        size = (args.img_size[0], args.img_size[-1])
        model = create_model(args.name, mhsa_blocks=mhsa, num_classes=args.num_classes, img_size=size,
                             act_layer=args.act_layer)
        report = measure_latency(model, size, backend=args.backend, precision=args.precision,
                                 repeats=args.repeats) if args.latency else None
        info = measure(model, size, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                       repeats=args.repeats)
    except (ValueError, BackendUnavailable, ExportError) as err:
        print(f"pathology model-info: {err}", file=sys.stderr)
        return 2
    print(f"model       {args.name}  mhsa_blocks={model.mhsa_blocks}  act_layer={args.act_layer}  "
          f"input {size[0]}x{size[1]} px")
    print(f"parameters  {info.params / 1e6:.2f} M")
    print(f"MACs        {info.macs / 1e9:.3f} G per image")
    print(f"latency     {info.latency_ms:.1f} ms (batch 1, {info.backend}, {torch.get_num_threads()} threads)")
    print(f"throughput  {info.throughput:.1f} img/s (batch {info.batch_size})")
    if report:
        print(format_table(report))
    if report and args.json:
        write_json(report, args.json)
    return 0
