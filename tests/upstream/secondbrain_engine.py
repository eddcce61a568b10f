"""Puts our job engine (jobs/engine/manager.py, jobs/engine/worker.py, jobs/engine/connector.py) in place of
Procrastinate's job manager, worker and psycopg pool, for Procrastinate's own test suite.

The repository is not put on sys.path: its `tests` package would hide Procrastinate's. Only its
`jobs` package and the two it imports (`config`, `core`) are loaded, from SECONDBRAIN_ENGINE_REPO.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def _load_package(repo: Path, name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        name, repo / name / "__init__.py", submodule_search_locations=[str(repo / name)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


# Prefixes of our settings that the engine reads (jobs/engine/, jobs/tasking/, core/tracing.py,
# config/database.py); the rest of config/settings.py stays out of upstream's suite.
_ENGINE_SETTING_PREFIXES = ("JOBS_", "WORKER_", "TRACING_", "DATABASE_")


def engine_settings() -> dict:
    """Our settings with those prefixes, as config/settings.py sets them with no environment of
    its own (read from a copy of it, run with a throw-away database URL and secret)."""
    repo = Path(os.environ["SECONDBRAIN_ENGINE_REPO"])
    for name in ("config", "core", "jobs"):
        _load_package(repo, name)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({name: value for name, value in saved.items() if not name.startswith(_ENGINE_SETTING_PREFIXES)})
    os.environ.update(
        {
            "DATABASE_URL": "postgres://upstream@127.0.0.1/upstream",
            "DEBUG": "true",
            "SECRET_KEY": "upstream-" + "x" * 40,
        }
    )
    try:
        spec = importlib.util.spec_from_file_location("secondbrain_settings", repo / "config" / "settings.py")
        assert spec is not None and spec.loader is not None
        ours = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ours)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {name: value for name, value in vars(ours).items() if name.startswith(_ENGINE_SETTING_PREFIXES)}


def install() -> None:
    repo = Path(os.environ["SECONDBRAIN_ENGINE_REPO"])
    for name in ("config", "core", "jobs"):  # the engine imports config.database and core.tracing
        _load_package(repo, name)

    import procrastinate.manager
    import procrastinate.worker
    from procrastinate import psycopg_connector

    try:
        from jobs.engine import connector, manager, worker
    except ImportError:  # an engine from before jobs/ had rooms: lets the suite compare with it
        from jobs import connector, manager, worker
    BatchingJobManager, BatchingWorker = manager.BatchingJobManager, worker.BatchingWorker

    # App() and the tests build them through these module attributes.
    procrastinate.manager.JobManager = BatchingJobManager
    procrastinate.worker.Worker = BatchingWorker

    # (Named `_pool` before it was public: lets the suite compare with older engines.)
    worker_pool = getattr(connector, "worker_pool", None) or getattr(connector, "_pool")  # noqa: B009
    original_init = psycopg_connector.PsycopgConnector.__init__

    def init(self, *args, pool_factory=None, **kwargs):
        original_init(self, *args, pool_factory=pool_factory or worker_pool, **kwargs)

    psycopg_connector.PsycopgConnector.__init__ = init
