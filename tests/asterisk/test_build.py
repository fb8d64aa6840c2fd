"""provisioning/asterisk-build.sh against the real tarballs and the build this group runs on: a second run
finds it installed and changes nothing (its marker is the cache key of the tarballs' hashes)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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


def test_the_system_setup_writes_the_operators_files_and_a_unit(tmp_path: Path) -> None:
    """Without --no-service: user and group asterisk (here stand-ins that only log what they were asked),
    asterisk.conf/modules.conf/logger.conf written once into the prefix's etc, and asterisk.service."""
    if (reason := missing_prerequisite()) is not None:
        pytest.skip(reason)
    sources = next((d for d in SOURCES if all((d / t).exists() for t in TARBALLS)), None)
    if sources is None:
        pytest.skip("the Asterisk tarballs are not here (../shared/asterisk)")
    shims = tmp_path / "bin"
    shims.mkdir()
    calls = tmp_path / "calls.log"
    for tool in ("getent", "groupadd", "useradd", "chown", "chgrp"):
        status = 2 if tool == "getent" else 0  # getent: "no such user/group"
        (shims / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit {status}\n')
        (shims / tool).chmod(0o755)
    etc = PREFIX / "etc" / "asterisk"
    ours = ["asterisk.conf", "modules.conf", "logger.conf"]
    existed = {name for name in ours if (etc / name).exists()}
    units = tmp_path / "systemd"
    units.mkdir()
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", AZIZA_SYSTEMD_DIR=str(units))
    try:
        done = subprocess.run([str(REPO / "provisioning" / "asterisk-build.sh"), str(sources / TARBALLS[0]),
                               str(sources / TARBALLS[1]), "--prefix", str(PREFIX)],
                              capture_output=True, text=True, timeout=300, check=False, env=env)
        assert done.returncode == 0, done.stderr
        logged = calls.read_text()
        assert "groupadd --system asterisk" in logged and "useradd --system --gid asterisk" in logged
        assert f"chgrp asterisk {etc}" in logged
        conf = (etc / "asterisk.conf").read_text()
        dirs = dict(line.split(" => ") for line in conf.splitlines() if " => " in line)
        assert (Path(dirs["astmoddir"]) / "res_ari.so").exists()
        assert (Path(dirs["astdatadir"]) / "moh").resolve() == Path("/usr/share/asterisk/moh")
        assert (Path(dirs["astdatadir"]) / "sounds" / "en" / "goodbye.wav").exists()
        assert "autoload=yes" in (etc / "modules.conf").read_text()
        unit = (units / "asterisk.service").read_text()
        start = f"ExecStart={PREFIX}/sbin/asterisk -C {etc}/asterisk.conf -f -p -U asterisk -G asterisk"
        assert start in unit  # (-p: real-time, as Debian's own unit runs it)
        again = subprocess.run([str(REPO / "provisioning" / "asterisk-build.sh"), str(sources / TARBALLS[0]),
                                str(sources / TARBALLS[1]), "--prefix", str(PREFIX)],
                               capture_output=True, text=True, timeout=300, check=False, env=env)
        assert again.returncode == 0 and "wrote" not in again.stdout  # written once, never overwritten
    finally:
        for name in ours:
            if name not in existed:
                (etc / name).unlink(missing_ok=True)
