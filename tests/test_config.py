from __future__ import annotations

import pytest

from autopeft.config import SearchConfig, parse_memory
from autopeft.errors import ConfigError


@pytest.mark.parametrize(("text", "expected"), [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1.5 GiB", int(1.5 * 2**30)),
                                                ("1024", 1024)])
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["-1GiB", "eight", "8 parsecs", "0GiB", ""])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="memory budget"):
        parse_memory(text)


def test_config_collects_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        SearchConfig(trials=-1, max_steps=-1, study="a b", space="/no/such.yaml")
    assert len(info.value.problems) == 4
