"""provisioning/asterisk-build.sh against the real tarballs and the build this group runs on: a second run
finds it installed and changes nothing (its marker is the cache key of the tarballs' hashes)."""

from __future__ import annotations

import subprocess

import pytest

from tests.asterisk.appliance import PREFIX, REPO, SOURCES, TARBALLS, missing_prerequisite

pytestmark = pytest.mark.asterisk


def test_a_second_run_is_a_no_op() -> None:
    if (reason := missing_prerequisite()) is not None:
        pytest.skip(reason)
    sources = next((d for d in SOURCES if all((d / t).exists() for t in TARBALLS)), None)
    if sources is None:
        pytest.skip("the Asterisk tarballs are not here (../shared/asterisk)")
    marker = PREFIX / "share" / "aziza" / "asterisk-build"
    before = marker.stat().st_mtime_ns, (PREFIX / "sbin" / "asterisk").stat().st_mtime_ns
    done = subprocess.run([str(REPO / "provisioning" / "asterisk-build.sh"), str(sources / TARBALLS[0]),
                           str(sources / TARBALLS[1]), "--prefix", str(PREFIX), "--no-service"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "is already installed" in done.stdout and "nothing to do" in done.stdout
    assert "Asterisk 22.10.1" in done.stdout
    assert (PREFIX / "sbin" / "asterisk").stat().st_mtime_ns == before[1]  # the binary was not touched
    assert marker.read_text().strip().startswith("asterisk-22.10.1-")
