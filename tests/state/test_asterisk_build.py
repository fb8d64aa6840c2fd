"""provisioning/asterisk-build.sh on bad input: one clear line, a non-zero exit, and nothing half-written
(no cache entry, no build folder, nothing in the prefix). The real build is exercised by .ci/run and the
asterisk test group; here the script meets a missing tarball, a file that is no tarball, and sources
whose configure fails."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "provisioning" / "asterisk-build.sh"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AZIZA_ASTERISK_CACHE=str(tmp_path / "cache"))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def _tarball(path: Path, mode: str, files: dict[str, str]) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def test_usage_and_help(tmp_path: Path) -> None:
    result = _run(tmp_path)
    assert result.returncode == 2 and "ASTERISK_TARBALL PJPROJECT_TARBALL" in result.stderr
    helped = _run(tmp_path, "--help")
    assert helped.returncode == 0 and "--prefix DIR" in helped.stdout


def test_missing_and_unreadable_tarballs(tmp_path: Path) -> None:
    pj = _tarball(tmp_path / "pjproject-2.17.tar.bz2", "w:bz2", {"pjproject-2.17/README": "x"})
    absent = tmp_path / "asterisk-22.10.1.tar.gz"
    missing = _run(tmp_path, str(absent), str(pj), "--prefix", str(tmp_path / "p"))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"asterisk-build: tarball not found: {tmp_path / 'asterisk-22.10.1.tar.gz'}"]
    garbage = tmp_path / "asterisk-22.10.1.tar.gz"
    garbage.write_bytes(b"<html>a download that went wrong</html>")
    bad = _run(tmp_path, str(garbage), str(pj), "--prefix", str(tmp_path / "p"))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "asterisk-build: not an Asterisk 22+ source tarball (gzip, top folder asterisk-2x.y.z/): "
        f"{garbage}"]
    relative = _run(tmp_path, str(garbage), str(pj), "--prefix", "relative/dir")
    assert relative.returncode == 1 and "must be an absolute path" in relative.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "p").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="checks the Debian build packages as root would")
def test_a_failed_build_names_the_step_and_the_log(tmp_path: Path) -> None:
    asterisk = _tarball(tmp_path / "asterisk-22.99.0.tar.gz", "w:gz", {
        "asterisk-22.99.0/configure": "#!/bin/sh\necho 'checking for a C compiler... no' >&2\nexit 1\n"})
    pj = _tarball(tmp_path / "pjproject-2.17.tar.bz2", "w:bz2", {"pjproject-2.17/README": "x"})
    result = _run(tmp_path, str(asterisk), str(pj), "--prefix", str(tmp_path / "prefix"), "--no-service")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("asterisk-build: build failed at 'configure'; log: ")
    log = Path(error[0].split("log: ")[1].split(" (last lines")[0])
    assert log.is_file() and "checking for a C compiler... no" in log.read_text()
    assert "checking for a C compiler... no" in error[0]  # the log's last lines, on that one line
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [log.name]  # no build dir
    assert not (tmp_path / "prefix").exists()
