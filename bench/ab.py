"""An A/B of the worker on a machine too noisy for two separate runs to compare: the same drain
of queued no-op jobs (the processing figure's, one worker process as `make run` starts it),
alternating the variants round after round on the same database, each variant an environment
of the worker. Prints each run and the medians.

    python -m bench.ab --rounds 4 ahead=JOBS_CLAIM_AHEAD_MS:5 plain=JOBS_CLAIM_AHEAD_MS:0
    python -m bench.ab uvloop= asyncio=JOBS_EVENT_LOOP:asyncio     # `name=` alone: the defaults
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench import figures
from bench.run import prepare_bench


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, settings = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected name=VAR:value,VAR:value")
    pairs = [pair.split(":", 1) for pair in settings.split(",") if pair]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: each setting is VAR:value")
    return name, dict(pairs)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", type=_variant, help="name=VAR:value,VAR:value")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20000)
    args = parser.parse_args(argv)
    bench, started = prepare_bench()
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in args.variants}
    try:
        for _ in range(args.rounds):
            for name, env in args.variants:
                figures.queue_noop_jobs(bench, args.jobs)
                out = figures.drain(bench, "bench.noop", args.jobs, lambda env=env: bench.project_worker(env=env))
                bench.stop_children()
                runs[name].append((out["client_rate"], out["worker_us"], out["postgres_us"]))
                print(
                    f"{name}: {out['client_rate']:,.0f} jobs/s, worker {out['worker_us']:.1f} µs/job,"
                    f" PostgreSQL {out['postgres_us']:.1f} µs/job",
                    flush=True,
                )
    finally:
        bench.stop_children()
        if started:
            import devdb

            devdb.stop()
    for name, values in runs.items():
        rate, worker, postgres = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"median {name}: {rate:,.0f} jobs/s, worker {worker:.1f} µs/job, PostgreSQL {postgres:.1f} µs/job")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
