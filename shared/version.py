"""The version of the installed stackfleet distribution (from its package metadata)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "stackfleet"
UNKNOWN = "0.0.0+unknown"


def installed_version() -> str:
    """What pip installed (wheel or editable checkout); ``0.0.0+unknown`` when run from a bare tree."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN
