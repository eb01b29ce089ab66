"""Fixtures of the reliability tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a module's last test, print its ``TALLY`` (a tests._helpers.Tally), if it has one:
    how many of each kind of injected fault it tried and how many passed (run with -s)."""
    yield
    tally = getattr(request.module, "TALLY", None)
    if tally is not None:
        for line in tally.lines():
            print(f"\n{line}")
