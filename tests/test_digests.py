"""Every kind of file lowbit writes is byte-identical to what the code wrote before the
architecture redesign (issue 9): the digests in ``digests.json`` were made by
``tests/digest_cases.py`` at commit 8184332, the last commit before it, on this machine type."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import os

from digest_cases import SLOW, STORIES, WIKITEXT, run_cases

EXPECTED = json.loads((Path(__file__).with_name("digests.json")).read_text())


@pytest.fixture(scope="module")
def digests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not STORIES.exists() or not WIKITEXT.exists():
        pytest.fail(f"the digest cases need {STORIES} and {WIKITEXT} (../shared beside the repository)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_cases(tmp_path_factory.mktemp("digests"))


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_written_bytes_unchanged(digests: dict[str, str], case: str) -> None:
    if case in SLOW and os.environ.get("LOWBIT_SLOW_TESTS") != "1":
        pytest.skip("slow IQ encoder case: LOWBIT_SLOW_TESTS=1 runs it")
    assert digests[case] == EXPECTED[case], f"{case}: the written file changed"
