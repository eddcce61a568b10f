"""`make bench`: the benchmark suite. One table (and bench/results/latest.json), each figure next
to a reference measured in the same run where one applies.

    python -m bench.run                  # everything (stops itself after 15 minutes)
    python -m bench.run --only enqueue,processing
    python -m bench.run --quick          # smaller runs, for a smoke test
    python -m bench.run --only soak      # a million jobs (`make soak`; not part of a plain run)

It creates a fresh `secondbrain_bench` database on the server of DATABASE_URL (or on the
embedded PostgreSQL when DATABASE_URL is unset), so it never touches your data.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import devdb

from bench import feature_costs, figures, soak
from bench.harness import BASE_DIR, Bench, Figure

RESULTS = BASE_DIR / "bench" / "results" / "latest.json"
TIME_BUDGET_SECONDS = 15 * 60
GROUPS = {**figures.GROUPS, "features": feature_costs.feature_costs}
# Too slow for a plain run: only with --only, each with its own budget on top of the suite's.
ON_REQUEST = {name: (group, soak.BUDGET_SECONDS) for name, group in soak.GROUPS.items()}


def _fresh_database(server_url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    with psycopg.connect(**{**info, "dbname": "postgres"}, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def prepare_bench() -> tuple[Bench, bool]:
    """Fresh bench databases (ours migrated, stock Procrastinate's schema on the other), Django
    set up in this process; True when it started the embedded PostgreSQL (stop it after)."""
    server_url, started = (os.environ["DATABASE_URL"], False) if os.environ.get("DATABASE_URL") else devdb.start()
    bench = Bench(
        _fresh_database(server_url, "secondbrain_bench"), _fresh_database(server_url, "secondbrain_bench_stock")
    )
    os.environ.update(bench.env)
    # The reference runs on a database of its own with stock Procrastinate's schema and nothing
    # of ours (no triggers, no functions), on the same server.
    subprocess.run(
        [sys.executable, "-m", "procrastinate", "--app=bench.stock_app.app", "schema", "--apply"],
        check=True,
        cwd=BASE_DIR,
        env=bench.env,
        capture_output=True,
    )
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return bench, started


def _table(rows: list[Figure]) -> str:
    header = ("figure", "value", "unit", "reference", "ratio", "target", "met")
    body = []
    for f in rows:
        value = "error" if f.value is None else f"{f.value:,.1f}"
        ref = f"{f.reference} {f.reference_value:,.1f}" if f.reference_value is not None else f.reference
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        met = "" if f.met is None else ("yes" if f.met else "NO")
        body.append((f.name, value, f.unit, ref, ratio, f.target, met))
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", default="", help="comma-separated figure groups: " + ", ".join([*GROUPS, *ON_REQUEST])
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--soak-jobs", type=int, default=soak.SOAK_JOBS, help="jobs of the soak groups")
    args = parser.parse_args(argv)
    groups = [g for g in args.only.split(",") if g] or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS and g not in ON_REQUEST]
    if unknown:
        parser.error(f"unknown group(s): {', '.join(unknown)}")
    runners = {
        **GROUPS,
        **{name: functools.partial(group, jobs=args.soak_jobs) for name, (group, _) in ON_REQUEST.items()},
    }
    budget = TIME_BUDGET_SECONDS + sum(ON_REQUEST[g][1] for g in groups if g in ON_REQUEST)

    bench, started = prepare_bench()

    def _budget_exceeded(signum, frame):
        raise TimeoutError(f"the benchmark ran past its {budget} s budget")

    signal.signal(signal.SIGALRM, _budget_exceeded)
    signal.alarm(budget)
    results: list[Figure] = []
    begun = time.monotonic()
    try:
        for group in groups:
            print(f"bench: {group} ...", flush=True)
            try:
                results.extend(runners[group](bench, quick=args.quick))
            except Exception as exc:  # one broken figure must not hide the others
                results.append(Figure(group, None, "", notes=f"{type(exc).__name__}: {exc}"))
                print(f"bench: {group} failed: {exc}", flush=True)
                if isinstance(exc, TimeoutError):
                    break
            finally:
                bench.stop_children()
    finally:
        signal.alarm(0)
        bench.stop_children()
        postgres_version = bench.scalar("SHOW server_version")
        if started:
            devdb.stop()

    print()
    print(_table(results))
    for f in results:
        if f.notes:
            print(f"  {f.name}: {f.notes}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - begun, 1),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
                "postgres": postgres_version,
                "figures": [f.as_dict() for f in results],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten to {RESULTS.relative_to(BASE_DIR)} in {time.monotonic() - begun:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
