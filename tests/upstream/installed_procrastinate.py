"""pytest plugin for the upstream suite: fails the run at once if the Procrastinate the tests
import is not the installed one (the version pinned in requirements/base.txt) but a copy from
the source directory, which would test the wrong code and pass or fail for the wrong reason."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    import procrastinate

    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    location = Path(procrastinate.__file__).resolve()
    if site_packages not in location.parents:
        raise pytest.UsageError(f"Procrastinate imported from {location}, not from {site_packages}")
