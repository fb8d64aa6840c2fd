"""docs/metrics.md documents every metric family the bridge and the engine expose, and names no other."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.observability.exposed import exposed_names, family_names, metric_names

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def test_every_family_documented_and_no_stale_name(monkeypatch: pytest.MonkeyPatch) -> None:
    documented = metric_names(DOC.read_text())
    families = family_names(monkeypatch)
    assert not families - documented, f"undocumented in docs/metrics.md: {sorted(families - documented)}"
    unknown = documented - families - exposed_names(monkeypatch)
    assert not unknown, f"docs/metrics.md names metrics the code does not expose: {sorted(unknown)}"
