"""The compiled media modules (bridge/native.py): one source, run compiled or not, never stale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge import native

ROOT = Path(__file__).resolve().parents[2]


def test_compiled_modules_are_not_older_than_their_sources() -> None:
    assert native.stale_modules() == [], (
        "compiled media modules are older than their sources: the tests would run old code. Rebuild: "
        "provisioning/install.sh --dev (or .venv/bin/python setup.py build_ext --inplace --force)"
    )


def test_the_hot_modules_are_all_compiled_or_all_sources() -> None:
    compiled = native.compiled_modules()
    assert compiled in ([], list(native.NATIVE_MODULES))


def _run(code: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pure_python_runs_the_sources_even_where_compiled_modules_are_installed() -> None:
    code = ("from bridge import native; import bridge.media.inbound as m; "
            "print(len(native.compiled_modules()), m.__file__.endswith('.py'))")
    assert _run(code, AZIZA_PURE_PYTHON="1") == "0 True"


def test_a_source_newer_than_its_compiled_module_is_stale(tmp_path: Path) -> None:
    if not native.compiled_modules():
        pytest.skip("the media modules are not compiled here (installed with AZIZA_NATIVE=0)")
    # A copy of the package tree with one source touched after its module was built.
    code = ("import os, shutil, sys, time; from pathlib import Path; "
            f"dst = Path({str(tmp_path)!r}) / 'tree'; "
            f"shutil.copytree({str(ROOT / 'bridge')!r}, dst / 'bridge', symlinks=True); "
            "src = dst / 'bridge' / 'media' / 'jitter.py'; t = time.time() + 60; os.utime(src, (t, t)); "
            "sys.path.insert(0, str(dst)); "
            "[sys.modules.pop(k) for k in list(sys.modules) if k == 'bridge' or k.startswith('bridge.')]; "
            "from bridge import native; print(native.stale_modules())")
    assert _run(code) == "['bridge.media.jitter']"


@pytest.mark.skipif(not native.compiled_modules(), reason="the media modules are not compiled here")
def test_the_sources_pass_the_sans_io_media_tests_too() -> None:
    """The suite runs the compiled modules; the same sans-IO tests on the sources keep the fallback honest."""
    tests = ["tests/media/test_jitter.py", "tests/media/test_inbound.py", "tests/media/test_outbound.py",
             "tests/media/test_rtp.py"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *tests], cwd=ROOT,
        capture_output=True, text=True, env={**os.environ, "AZIZA_PURE_PYTHON": "1"}, timeout=300,
        check=False)
    assert result.returncode == 0, result.stdout[-3000:]
