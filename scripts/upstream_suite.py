"""Procrastinate's own integration and acceptance tests, run against our job engine.

    make upstream ARGS="[--source DIR] [--python PY] [--stock] [pytest args]"
    .venv/bin/python scripts/upstream_suite.py [same arguments]

Two things outside this repository, prepared here when missing:

- DIR (`--source`, PROCRASTINATE_SRC): Procrastinate's source with its tests/ and pyproject.toml,
  at the version pinned in requirements/base.txt. When DIR does not exist, the script takes
  PyPI's source distribution of that version if it carries the tests; 3.10.0's does not (only
  the package), so DIR must then come from Procrastinate's repository, at that version's tag or
  the commit nearest it (docs/reliability.md says how).
- PY (`--python`, UPSTREAM_PYTHON): the Python of a separate virtualenv holding
  requirements/upstream.txt (our runtime pins plus Procrastinate's test dependencies). Created
  from PyPI when missing, and brought up to date whenever that file or base.txt changes.

The tests import the installed Procrastinate, never the source's copy: only its tests/ is used,
copied with its pyproject.toml to a scratch directory under .data/ (pytest puts the directory of
its settings file on sys.path: DIR's copy would be imported), and
tests/upstream/ puts our manager, worker and pool in place of Procrastinate's in every process,
the CLI workers of the acceptance tests included (`--stock` leaves Procrastinate's own, to
compare). The embedded PostgreSQL (scripts/devdb.py) serves the databases the tests create and
drop. Unless an argument names tests (tests/...), it runs tests/integration and tests/acceptance.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import devdb

BASE_DIR = Path(__file__).resolve().parent.parent
SCRATCH = BASE_DIR / ".data" / "upstream"
REQUIREMENTS = [BASE_DIR / "requirements" / "base.txt", BASE_DIR / "requirements" / "upstream.txt"]

# Tests of the source that cannot pass on the installed release, whichever engine runs: left out
# unless --all is given (docs/reliability.md lists them). Stock 3.10.0 fails them as we do.
NOT_FOR_THE_RELEASE = {
    "tests/integration/contrib/sphinx/test_autodoc.py::test_autodoc_task": (
        "documents procrastinate.demos, which the released package leaves out"
    ),
    "tests/integration/test_cli.py::test_cli_logging_configuration": (
        "passes --verbose, which 3.10.0 deprecates with a warning the suite turns into an error"
    ),
}


def pinned_version() -> str:
    match = re.search(r"^procrastinate(?:\[[^\]]*\])?==(\S+)", REQUIREMENTS[0].read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit("upstream: no procrastinate==<version> pin in requirements/base.txt")
    return match.group(1)


def prepare_python(python: Path) -> None:
    """The suite's virtualenv at `python`'s prefix, created if missing, synced to the pins."""
    venv = python.parent.parent
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in REQUIREMENTS)).hexdigest()[:16]
    stamp = venv / f".installed-{digest}"
    if stamp.exists():
        return
    if not python.exists():
        print(f"upstream: creating the virtualenv {venv}", file=sys.stderr)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"upstream: installing requirements/upstream.txt into {venv}", file=sys.stderr)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS[1])], check=True)
    for old in venv.glob(".installed-*"):
        old.unlink()
    stamp.touch()


def prepare_source(source: Path, python: Path) -> None:
    """Procrastinate's tests at `source`: PyPI's sdist of the pinned version if it has them."""
    if (source / "tests" / "integration").is_dir() and (source / "pyproject.toml").is_file():
        return
    if source.exists():
        raise SystemExit(f"upstream: {source} holds no tests/integration and pyproject.toml")
    version = pinned_version()
    with tempfile.TemporaryDirectory() as download:
        print(f"upstream: looking for the tests in PyPI's sdist of procrastinate {version}", file=sys.stderr)
        pip = [str(python), "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
        subprocess.run([*pip, "--no-binary", ":all:", f"procrastinate=={version}", "-d", download], check=True)
        (sdist,) = Path(download).glob("procrastinate-*.tar.gz")
        with tarfile.open(sdist) as archive:
            top = f"procrastinate-{version}/"
            if not any(name.startswith(top + "tests/integration/") for name in archive.getnames()):
                raise SystemExit(
                    f"upstream: PyPI's sdist of procrastinate {version} has no tests. Point PROCRASTINATE_SRC"
                    f" (or --source) at Procrastinate's repository at tag {version} (or the commit nearest"
                    " it): see docs/reliability.md, 'Procrastinate's own tests against this engine'."
                )
            staging = Path(download) / "extracted"
            archive.extractall(staging, filter="data")
        source.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / top.rstrip("/")), source)


def copy_tests(source: Path) -> None:
    # pytest puts the directory of its settings file (and of the tests, links resolved) on
    # sys.path: were it the source directory, the source's own procrastinate/ would be imported.
    target = SCRATCH / "tests"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "tests", target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(source / "pyproject.toml", SCRATCH / "pyproject.toml")  # pytest's settings


def _sigint_by_default() -> None:
    # Started in the background of a script, this process and its children ignore SIGINT, and the
    # acceptance tests stop their workers with one: a worker still starting would never stop.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.environ.get("PROCRASTINATE_SRC", "/work/wt/procrastinate-src"))
    parser.add_argument("--python", default=os.environ.get("UPSTREAM_PYTHON", "/work/wt/pvenv/bin/python"))
    parser.add_argument("--engine", default=str(BASE_DIR), help="the repository whose jobs/ engine is tested")
    parser.add_argument("--stock", action="store_true", help="Procrastinate's own engine, for comparison")
    parser.add_argument("--all", action="store_true", help="also the tests that cannot pass on the release")
    options, pytest_args = parser.parse_known_args(argv)

    source = Path(options.source).absolute()
    python = Path(options.python).absolute()  # not resolved: a virtualenv's python is a link
    prepare_python(python)
    prepare_source(source, python)
    copy_tests(source)

    url, started = devdb.start()
    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    env = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": port,
        "PGUSER": "postgres",
        # The acceptance tests run `procrastinate ...`: the virtualenv's own.
        "PATH": os.pathsep.join([str(python.parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(BASE_DIR / "tests" / "upstream"), str(SCRATCH)]),
    }
    env.pop("SECONDBRAIN_ENGINE_REPO", None)
    plugins = []
    if not options.stock:
        env["SECONDBRAIN_ENGINE_REPO"] = str(Path(options.engine).resolve())
        # Upstream's Django settings with the engine's own added (tests/upstream/).
        env["DJANGO_SETTINGS_MODULE"] = "secondbrain_upstream_settings"
        plugins = ["-p", "schema_plugin"]
    deselect = [] if options.all else [f"--deselect={test}" for test in NOT_FOR_THE_RELEASE]
    paths = [] if any(arg.startswith("tests") for arg in pytest_args) else ["tests/integration", "tests/acceptance"]
    command = [
        str(python),
        "-m",
        "pytest",
        "-c",
        str(SCRATCH / "pyproject.toml"),
        "--rootdir",
        str(SCRATCH),
        "-p",
        "no:python_path",  # its `pythonpath = ["."]` would import the source's Procrastinate
        "-p",
        "no:cacheprovider",
        "-p",
        "installed_procrastinate",
        *plugins,
        *deselect,
        *pytest_args,
        *paths,
    ]
    try:
        return subprocess.run(command, cwd=SCRATCH, env=env, preexec_fn=_sigint_by_default).returncode
    finally:
        if started:
            devdb.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
