"""Everything is in pyproject.toml but the compiled media modules: mypyc builds those listed in
bridge/native.py (its docstring says why). ``AZIZA_NATIVE=0`` installs the sources alone."""

import os
import runpy

from setuptools import setup


def _native_extensions() -> list:
    if os.environ.get("AZIZA_NATIVE", "1") == "0":
        return []
    from mypyc.build import mypycify  # (a build requirement: pyproject.toml's [build-system])

    modules = runpy.run_path(os.path.join("bridge", "native.py"))["NATIVE_MODULES"]
    paths = [os.path.join(*name.split(".")) + ".py" for name in modules]
    return mypycify(paths, opt_level="3", group_name="bridge.media._compiled")


setup(ext_modules=_native_extensions())
