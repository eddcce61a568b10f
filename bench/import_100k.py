"""Bulk import of 100,000 rows in bounded memory: prints the seconds and the peak RSS growth.

    python -m bench.import_100k                 # 100,000 CSV rows
    python -m bench.import_100k --rows 20000 --format jsonl

It creates a fresh `secondbrain_bench_import` database on the server of DATABASE_URL (or on the
embedded PostgreSQL when DATABASE_URL is unset), generates the file on disk row by row, stores
it through `note_import_create` (COPY, streamed), then runs the import in this process exactly
as the `notes.import` job does (`note_import_run`). It fails (exit 1) when the resident set grew
by more than --max-rss-mb while importing, or when the counts are wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
sys.path.insert(0, str(BASE_DIR / "scripts"))
import devdb  # noqa: E402

DATABASE = "secondbrain_bench_import"


def _fresh_database(server_url: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    with psycopg.connect(**{**info, "dbname": "postgres"}, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{DATABASE}"))


def _write_rows(out, *, rows: int, fmt: str) -> None:
    """About 150 bytes a row, a tag or two, a link now and then, every 50th row a duplicate."""
    if fmt == "csv":
        out.write(b"title,content,tags,external_id\n")
    for i in range(rows):
        n = i - 1 if i % 50 == 49 else i
        content = (
            f"Note {n}: notes on queues and #postgres, see https://example.com/{n} for more about batch {n // 1000}"
        )
        if fmt == "csv":
            out.write(f'"Title {n}","{content}","bench, import",ext-{n}\n'.encode())
        else:
            row = {"title": f"Title {n}", "content": content, "tags": ["bench", "import"], "external_id": f"ext-{n}"}
            out.write((json.dumps(row) + "\n").encode())


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    parser.add_argument("--max-rss-mb", type=float, default=300.0)
    args = parser.parse_args(argv)

    server_url = os.environ.get("DATABASE_URL") or devdb.start()[0]
    os.environ["DATABASE_URL"] = _fresh_database(server_url)
    os.environ.setdefault("SECRET_KEY", "bench-" + "x" * 40)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from notes import services
    from notes.models import Note

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create_user("bench")

    with tempfile.TemporaryFile() as file:
        _write_rows(file, rows=args.rows, fmt=args.format)
        size = file.tell()
        started = time.perf_counter()
        note_import = services.note_import_create(
            owner=owner, file=file, filename=f"bench.{args.format}", format=args.format
        )
        stored_seconds = time.perf_counter() - started

    rss_before = _rss_mb()
    started = time.perf_counter()
    note_import = services.note_import_run(import_id=note_import.id)
    seconds = time.perf_counter() - started
    rss_growth = _rss_mb() - rss_before

    duplicates = args.rows // 50
    ok = (
        note_import.status == "done"
        and note_import.total == args.rows
        and note_import.imported == args.rows - duplicates
        and note_import.duplicates == duplicates
        and note_import.skipped == 0
        and Note.objects.count() == args.rows - duplicates
        and rss_growth < args.max_rss_mb
    )
    print(
        f"{args.rows:,} {args.format} rows ({size / 1e6:.1f} MB, batches of {settings.IMPORTS_BATCH_SIZE}):"
        f" stored in {stored_seconds:.1f} s, imported in {seconds:.1f} s ({args.rows / seconds:,.0f} rows/s);"
        f" imported {note_import.imported:,}, duplicates {note_import.duplicates:,}, skipped {note_import.skipped:,};"
        f" peak RSS growth {rss_growth:.1f} MB (limit {args.max_rss_mb:.0f} MB, process peak {_rss_mb():.0f} MB)"
    )
    if not ok:
        print("FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
