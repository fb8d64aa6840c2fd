"""The installed package's version, for every command's ``--version``."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    try:
        return metadata.version("aziza")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"
