"""``MhsaBlocks``: every form the edge reads gives the same value, which prints as the CLI form."""
from __future__ import annotations

import json
import pickle

import pytest

from pathology.models.mhsa import MhsaBlocks


@pytest.mark.parametrize("given", ["16:2,32:1", " 32:1 , 16:2 ", {16: 2, 32: 1}, {"32": 1, "16": "2"},
                                   {16: 2, 32: 1, 8: 0}, MhsaBlocks({16: 2, 32: 1})])
def test_every_form_parses_to_the_same_value(given: object) -> None:
    blocks = MhsaBlocks.parse(given)
    assert blocks == {16: 2, 32: 1} and list(blocks) == [16, 32]
    assert str(blocks) == "16:2,32:1"


def test_no_attention_reads_and_prints_as_none() -> None:
    assert MhsaBlocks.parse("") == MhsaBlocks.parse("none") == MhsaBlocks.parse({}) == {}
    assert str(MhsaBlocks()) == "none"


@pytest.mark.parametrize(("given", "message"), [
    ("16", "STRIDE:COUNT"), ("16:x", "STRIDE:COUNT"), ({64: 1}, "stride 64"), ({"sixteen": 1}, "stride 'sixteen'"),
    ({16: -1}, "non-negative"), ({16: 1.5}, "non-negative"), (3, "mapping"),
])
def test_bad_values_raise(given: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MhsaBlocks.parse(given)


def test_plain_on_disk() -> None:
    """Checkpoints and JSON hold it as a plain dict; pickling (DataLoader workers) round-trips it."""
    blocks = MhsaBlocks({16: 1, 32: 1})
    assert type(blocks.to_dict()) is dict and blocks.to_dict() == {16: 1, 32: 1}
    assert json.loads(json.dumps(blocks)) == {"16": 1, "32": 1}
    assert MhsaBlocks.parse(json.loads(json.dumps(blocks))) == blocks
    assert pickle.loads(pickle.dumps(blocks)) == blocks
