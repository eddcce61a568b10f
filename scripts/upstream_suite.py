"""Procrastinate's own integration and acceptance tests, run against our job engine.

    .venv/bin/python scripts/upstream_suite.py [--source DIR] [--python PY] [--engine REPO] [pytest args]

Needs no network: DIR is a checkout of Procrastinate's repository (the commit nearest the
version in requirements/base.txt), PY the Python of a separate virtualenv holding our
requirements/base.txt pins plus Procrastinate's test dependencies (pytest, pytest-asyncio,
pytest-mock, pytest-django, pytest-benchmark, results, aiopg, psycopg2-binary, sqlalchemy,
sphinx). See docs/reliability.md ("Workers that come back, locks, and where the engine differs from Procrastinate").

The tests import the installed Procrastinate (not the checkout's copy: only its tests/ is used,
through a scratch directory under .data/), and tests/upstream/ puts our manager, worker and pool
in place of Procrastinate's in every process, the CLI workers of the acceptance tests included.
The embedded PostgreSQL (scripts/devdb.py) serves the databases the tests create and drop.
Unless an argument names tests (tests/...), it runs tests/integration and tests/acceptance.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import devdb

BASE_DIR = Path(__file__).resolve().parent.parent
SCRATCH = BASE_DIR / ".data" / "upstream"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.environ.get("PROCRASTINATE_SRC", "/work/wt/procrastinate-src"))
    parser.add_argument("--python", default=os.environ.get("UPSTREAM_PYTHON", "/work/wt/pvenv/bin/python"))
    parser.add_argument("--engine", default=str(BASE_DIR), help="the repository whose jobs/ engine is tested")
    parser.add_argument("--stock", action="store_true", help="Procrastinate's own engine, for comparison")
    options, pytest_args = parser.parse_known_args(argv)

    source = Path(options.source).resolve()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    link = SCRATCH / "tests"
    if link.is_symlink() and link.resolve() != source / "tests":
        link.unlink()
    if not link.exists():
        link.symlink_to(source / "tests")

    url, started = devdb.start()
    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    env = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": port,
        "PGUSER": "postgres",
        # The acceptance tests run `procrastinate ...`: the virtualenv's own (not resolved: a
        # virtualenv's python is a link to the base interpreter).
        "PATH": os.pathsep.join([str(Path(options.python).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(BASE_DIR / "tests" / "upstream"), str(SCRATCH)]),
    }
    plugins = []
    if not options.stock:
        env["SECONDBRAIN_ENGINE_REPO"] = str(Path(options.engine).resolve())
        plugins = ["-p", "schema_plugin"]
    paths = [] if any(arg.startswith("tests") for arg in pytest_args) else ["tests/integration", "tests/acceptance"]
    command = [
        options.python,
        "-m",
        "pytest",
        "-c",
        str(source / "pyproject.toml"),
        "--rootdir",
        str(SCRATCH),
        "-p",
        "no:python_path",  # its `pythonpath = ["."]` would import the checkout's Procrastinate
        "-p",
        "no:cacheprovider",
        *plugins,
        *pytest_args,
        *paths,
    ]
    try:
        return subprocess.run(command, cwd=SCRATCH, env=env).returncode
    finally:
        if started:
            devdb.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
