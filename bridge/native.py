"""The media path's compiled modules: mypyc builds them at install time (``setup.py``), from the same typed
sources, and Python imports the compiled module where there is one.

Why mypyc: the media path is about a hundred small Python calls per packet per call (parse, jitter buffer,
slot grid, histograms); the interpreter was two thirds of the bridge's CPU. mypyc compiles exactly these
typed modules to C with the semantics kept (and their annotations checked at run time), so there is one
source, readable and tested, and no hand-written C. Modules with I/O, asyncio or ctypes stay interpreted.

* ``AZIZA_NATIVE=0`` when installing: nothing is compiled (the sources run as they are).
* ``AZIZA_PURE_PYTHON=1`` when running: the sources run even where compiled modules are installed (the
  benchmarks' side-by-side runs; the same behaviour, slower).
* A compiled module older than its source is stale (an edit not rebuilt): :func:`stale_modules` names them,
  the bridge warns at start, and the test suite fails. Rebuild with ``provisioning/install.sh`` (or
  ``python setup.py build_ext --inplace --force`` in a dev checkout: ``--force``, because a checkout that
  touched a source without changing it leaves the build's C as it was, and setuptools would copy nothing).

This file is read by ``setup.py`` before the package is installed: it imports nothing of the project.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: Compiled, in dependency order. Each is typed, sans-IO (or numpy and the stdlib only), and on the hot path.
NATIVE_MODULES: tuple[str, ...] = (
    "bridge.media.rtp",
    "bridge.media.jitter",
    "bridge.media.codecs",
    "bridge.media.fir_resample",
    "bridge.media.framing",
    "bridge.media.metrics",
    "bridge.media.turns",
    "bridge.media.pacer",
    "bridge.media.playout_phase",
    "bridge.media.read_schedule",
    "bridge.media.inbound",
    "bridge.media.outbound",
)
PURE_ENV = "AZIZA_PURE_PYTHON"
_STALE_TOLERANCE_S = 2.0  # (an install writes the source and its module within this of each other)


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds the native modules' ``.py`` sources, ahead of the compiled modules beside them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in NATIVE_MODULES or not path:
            return None
        loader = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, loader).find_spec(fullname)
            if spec is not None:
                return spec
        return None


def use_sources() -> None:
    """From now on, import the native modules from their sources (call before they are imported)."""
    if not any(isinstance(finder, _SourcesFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())


def sources_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def compiled_modules() -> list[str]:
    """The native modules this process runs compiled (importing them all)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [name for name in NATIVE_MODULES
            if str(getattr(importlib.import_module(name), "__file__", "")).endswith(suffixes)]


def stale_modules() -> list[str]:
    """Native modules whose compiled file is older than their source (rebuild: see the module docstring)."""
    stale = []
    for name in NATIVE_MODULES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is None or origin.suffix == ".py":
            continue
        source = origin.with_name(name.rsplit(".", 1)[1] + ".py")
        if source.exists() and source.stat().st_mtime > origin.stat().st_mtime + _STALE_TOLERANCE_S:
            stale.append(name)
    return stale


__all__ = ["NATIVE_MODULES", "PURE_ENV", "compiled_modules", "sources_requested", "stale_modules",
           "use_sources"]
