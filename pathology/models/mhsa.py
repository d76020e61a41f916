"""Where a model has multi-head self-attention: ``{output stride: number of MHSA blocks}`` as one value.

Parsed once at the edge (a command line's ``"16:2,32:1"``, a YAML or JSON mapping with int or string
keys, a checkpoint's stored dict) into a frozen :class:`MhsaBlocks`, which then travels everywhere
(model, checkpoint spec, study grid, training). Its string form ``"16:2,32:1"`` (``"none"`` without
attention) is the one used in labels, file names and command lines.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["STAGE_STRIDES", "MhsaBlocks"]

STAGE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)  # output stride (input px per token) of each stage
NO_MHSA = "none"


class MhsaBlocks(dict[int, int]):
    """MHSA blocks per output stride, e.g. ``{16: 2, 32: 1}``, validated, strides ascending.

    A ``dict``, so it equals the plain dict it stands for, JSON writes it as one and jsonargparse can
    copy it (it rebuilds dicts key by key, so the type cannot refuse item assignment); treat it as a
    value and build a new one rather than changing it. Strides are stage output strides
    (:data:`STAGE_STRIDES`); zero counts are dropped.
    """

    __slots__ = ()  # no instance __dict__: copiers that read ``__dict__`` before items must see the items

    def __init__(self, counts: Mapping[int, int] | Iterable[tuple[int, int]] = ()) -> None:
        """Args:
            counts: ``{stride: blocks}`` (or its pairs) with int strides and counts; :meth:`parse` reads other forms.

        Raises:
            ValueError: a stride that is not a stage's output stride, or a negative count.
        """
        pairs = []
        for stride, count in counts.items() if isinstance(counts, Mapping) else counts:
            if stride not in STAGE_STRIDES:
                raise ValueError(f"mhsa_blocks: stride {stride!r} is not one of the stage strides {STAGE_STRIDES}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"mhsa_blocks: count for stride {stride} must be a non-negative integer, "
                                 f"got {count!r}")
            if count:
                pairs.append((stride, count))
        super().__init__(sorted(pairs))

    @classmethod
    def parse(cls, value: MhsaBlocks | Mapping[Any, Any] | str) -> MhsaBlocks:
        """The edge: ``"16:2,32:1"`` (``""`` or ``"none"``: no MHSA), or a mapping with int or digit-string
        keys and integer counts (YAML, JSON, an old checkpoint's dict); an :class:`MhsaBlocks` is returned as is.

        Raises:
            ValueError: an item that is not ``STRIDE:COUNT`` with integers, an unknown stride, a negative count.
        """
        if isinstance(value, MhsaBlocks):
            return value
        if isinstance(value, str):
            return cls(_parse_text(value))
        if not isinstance(value, Mapping):
            raise ValueError(f"mhsa_blocks must be 'STRIDE:COUNT,...' or a mapping, got {value!r}")
        return cls({_integer(key, "stride"): _integer(count, f"count for stride {key}")
                    for key, count in value.items()})

    def __str__(self) -> str:
        """``"16:2,32:1"``, or ``"none"`` without MHSA: the form of labels and command lines."""
        return ",".join(f"{stride}:{count}" for stride, count in self.items()) or NO_MHSA

    def __repr__(self) -> str:
        return f"MhsaBlocks({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return MhsaBlocks, (dict(self),)

    def to_dict(self) -> dict[int, int]:
        """A plain ``{stride: count}`` dict (what checkpoints store, so they load with ``weights_only``)."""
        return dict(self)


def _integer(value: Any, what: str) -> int:
    """``value`` as an int when it is one or a string of digits; raises ValueError naming ``what`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"mhsa_blocks: {what} {value!r} is not a non-negative integer")


def _parse_text(text: str) -> dict[int, int]:
    """``"16:2, 32:1"`` -> ``{16: 2, 32: 1}``; ``""`` and ``"none"`` -> ``{}``."""
    if text.strip().lower() == NO_MHSA:
        return {}
    blocks = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        stride, sep, count = item.partition(":")
        if not sep or not stride.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"mhsa_blocks item {item!r} is not STRIDE:COUNT, e.g. 16:2,32:1")
        blocks[int(stride)] = int(count)
    return blocks
