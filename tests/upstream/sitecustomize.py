"""Imported at start-up by every Python process of the upstream suite (scripts/upstream_suite.py
puts this directory on PYTHONPATH): the pytest process and the `procrastinate` CLI processes the
acceptance tests start. Does nothing unless SECONDBRAIN_ENGINE_REPO is set."""

from __future__ import annotations

import os

if os.environ.get("SECONDBRAIN_ENGINE_REPO"):
    import secondbrain_engine

    secondbrain_engine.install()
