#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    from config.startup import fail_fast_if_database_unreachable, use_worker_event_loop

    fail_fast_if_database_unreachable(sys.argv)
    use_worker_event_loop(sys.argv)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
