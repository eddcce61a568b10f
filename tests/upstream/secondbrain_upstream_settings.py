"""Django settings for Procrastinate's own suite on our engine (scripts/upstream_suite.py sets
DJANGO_SETTINGS_MODULE to this module when it tests our engine): upstream's test settings, plus
the settings of ours that the engine reads (a worker's host name, fair claims, the completion
window...), with the values config/settings.py gives them by default."""

from __future__ import annotations

from secondbrain_engine import engine_settings

from tests.acceptance.django_settings import *  # noqa: F403 (upstream's settings, whole)

globals().update(engine_settings())
