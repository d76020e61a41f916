"""The real-data fixture skips for users without ``../shared/data`` and fails in CI."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REQUIRE_DATA_ENV, real_data_root


def test_missing_data_skips_without_the_ci_variable(tmp_path: Path) -> None:
    with pytest.raises(pytest.skip.Exception, match="nowhere"):
        real_data_root({"PATHOLOGY_TEST_DATA": str(tmp_path / "nowhere")})


def test_missing_data_fails_when_ci_requires_it(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=f"nowhere.*{REQUIRE_DATA_ENV}"):
        real_data_root({"PATHOLOGY_TEST_DATA": str(tmp_path / "nowhere"), REQUIRE_DATA_ENV: "1"})


def test_present_data_is_returned(tmp_path: Path) -> None:
    assert real_data_root({"PATHOLOGY_TEST_DATA": str(tmp_path), REQUIRE_DATA_ENV: "1"}) == tmp_path
