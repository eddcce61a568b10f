"""Workflows: jobs that wait for other jobs, and batches whose callbacks run once at the end.

Dependencies:

    fetch = job_defer(feed_fetch, feed_id=1)
    parse = job_defer(feed_parse, after=[fetch], feed_id=1)          # runs once fetch succeeded
    a, b = job_chain(job_call(step_a, n=1), job_call(step_b, n=2))    # b after a
    *_, report = job_fan_in([job_call(part, n=i) for i in range(3)], then=job_call(report_make))

A job deferred `after=[...]` is not claimable until every parent has succeeded (the claim's
`jobs_parents_waiting = 0`, kept by the status trigger of migration 0008: no worker polls).
A parent that fails for good, is cancelled or aborted cancels its waiting children, with the
reason as their last error (`on_parent_failure="cancel"`, the default), or lets them run once
their other parents have ended (`"run"`). An operator's retry of that parent brings its
cancelled children back to waiting; they run when it succeeds. Parents are given when the
child is inserted, so they exist before it: a cycle cannot be built. A child reads its
parents' results with `job_parent_results(context)`.

Batches:

    with job_batch(on_complete=job_call(import_report, import_id=7), owner_id=user.id) as batch:
        for note_id in note_ids:
            job_defer(note_enrich, note_id=note_id)      # joins the batch
    batch.id

The callbacks (`on_success` when every member succeeded, else `on_failure`; `on_complete`
always) are deferred once, by the transaction that ends the last member, with the counts as
keyword arguments: `batch_id`, `total`, `succeeded`, `failed`, `cancelled` (and the call's own).
A batch built over several transactions is opened with `job_batch_open`, filled with
`job_defer(..., batch_id=...)` and closed with `job_batch_seal`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction
from procrastinate import JobContext
from procrastinate.tasks import Task

from jobs.models import JobBatch
from jobs.tasking.registry import task_options
from jobs.tasking.webhooks import webhook_callback_check

POLICIES = ("cancel", "run")
_ENDED = ("succeeded", "failed", "cancelled", "aborted")


@dataclass
class _BuildingBatch:
    """The batch of a `with job_batch()` block: created in this transaction, so no other one sees
    it, and its members are counted here and written once, when it is sealed."""

    id: int
    members: int = 0


_batch: contextvars.ContextVar[_BuildingBatch | None] = contextvars.ContextVar("jobs_batch", default=None)


@dataclass(frozen=True)
class JobCall:
    """A task with its arguments, to be deferred later (a chain's step, a batch's callback)."""

    task: Task
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # job_defer's own (owner_id, lock, ...)

    def spec(self) -> dict[str, Any]:
        """What the database needs to defer it (a batch's callback is deferred by a trigger)."""
        job = self.task.configure(**{k: v for k, v in self.options.items() if k in ("lock", "priority")})
        made = job.make_new_job()
        return {"task": made.task_name, "queue": made.queue, "priority": made.priority, "lock": made.lock,
                "kwargs": self.kwargs}  # fmt: skip


def job_call(task: Task, /, **kwargs: Any) -> JobCall:
    """`task` with its keyword arguments. For a chain's steps, `owner_id`, `lock`, `priority`
    and `queueing_lock` are job_defer's options, not the task's."""
    option_names = ("owner_id", "lock", "priority", "queueing_lock", "on_parent_failure")
    options = {k: kwargs.pop(k) for k in option_names if k in kwargs}
    return JobCall(task, kwargs, options)


# --- Dependencies -------------------------------------------------------------------------------

# The parents' rows, locked (their end waits for this transaction, so it sees the edges) and
# marked: their status trigger then looks for children. Locked in id order.
_PARENTS_LOCK = """
UPDATE procrastinate_jobs AS job SET jobs_has_children = true
  FROM (SELECT id FROM procrastinate_jobs WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id FOR NO KEY UPDATE) AS locked
 WHERE job.id = locked.id
RETURNING job.id, job.status
"""
_LINK = """
INSERT INTO jobs_job_dependencies (child_id, parent_id, on_parent_failure, state)
SELECT child_id, parent_id, %(policy)s,
       CASE WHEN parent_id = ANY(%(waiting)s::bigint[]) THEN 'waiting'
            WHEN parent_id = ANY(%(succeeded)s::bigint[]) THEN 'succeeded' ELSE 'failed' END
  FROM unnest(%(children)s::bigint[]) AS child_id, unnest(%(parents)s::bigint[]) AS parent_id
"""


@dataclass(frozen=True)
class _Parents:
    waiting: list[int]
    succeeded: list[int]

    def __len__(self) -> int:
        return len(self.waiting)


def parents_lock(after: Sequence[int], policy: str) -> _Parents:
    """Lock the parents of a job about to be inserted; which still have to end. Call inside the
    transaction that inserts the job."""
    if policy not in POLICIES:
        raise ValueError(f"on_parent_failure must be one of {', '.join(POLICIES)}")
    parents = sorted(set(after))
    if not parents:
        return _Parents([], [])
    with connection.cursor() as cursor:
        cursor.execute(_PARENTS_LOCK, {"ids": parents})
        status = dict(cursor.fetchall())
    missing = [job_id for job_id in parents if job_id not in status]
    if missing:
        raise ValueError(f"after: no job {', '.join(map(str, missing))}")
    failed = [job_id for job_id in parents if status[job_id] in _ENDED and status[job_id] != "succeeded"]
    if failed and policy == "cancel":
        raise ValueError(f"after: job {failed[0]} has already ended {status[failed[0]]}")
    return _Parents(
        waiting=[job_id for job_id in parents if status[job_id] not in _ENDED],
        succeeded=[job_id for job_id in parents if status[job_id] == "succeeded"],
    )


def parents_link(children: list[int], after: Sequence[int], parents: _Parents, policy: str) -> None:
    if not children or not after:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            _LINK,
            {
                "children": children,
                "parents": sorted(set(after)),
                "policy": policy,
                "waiting": parents.waiting,
                "succeeded": parents.succeeded,
            },
        )


def job_chain(*calls: JobCall, after: Sequence[int] = ()) -> list[int]:
    """Defer `calls` so that each runs after the one before (the first after `after`), in one
    transaction. Returns their ids. A step whose queueing lock made it a no-op breaks the chain
    there: ValueError, and nothing is deferred."""
    from jobs.tasking.defer import job_defer

    ids: list[int] = []
    with transaction.atomic():
        previous = list(after)
        for call in calls:
            job_id = job_defer(call.task, after=previous, **call.options, **call.kwargs)
            if job_id is None:
                raise ValueError(f"job_chain: {call.task.name} was not deferred (its queueing lock is taken)")
            ids.append(job_id)
            previous = [job_id]
    return ids


def job_fan_in(calls: Sequence[JobCall], *, then: JobCall, after: Sequence[int] = ()) -> list[int]:
    """Defer `calls` (each after `after`), then `then` after all of them, in one transaction.
    Returns the ids of `calls` followed by the id of `then`."""
    from jobs.tasking.defer import job_defer

    with transaction.atomic():
        ids = [job_defer(call.task, after=after, **call.options, **call.kwargs) for call in calls]
        parents = [job_id for job_id in ids if job_id is not None]
        last = job_defer(then.task, after=parents, **then.options, **then.kwargs)
    return [*parents, last]


_PARENT_RESULTS = """
SELECT d.parent_id, info.result
  FROM jobs_job_dependencies AS d LEFT JOIN jobs_job_info AS info ON info.job_id = d.parent_id
 WHERE d.child_id = %s ORDER BY d.parent_id
"""


def job_parent_results(context: JobContext) -> dict[int, Any]:
    """The results of the running job's parents, by parent id (None for a parent that returned
    nothing, or whose result has expired)."""
    with connection.cursor() as cursor:
        cursor.execute(_PARENT_RESULTS, [context.job.id])
        rows = cursor.fetchall()
    return {parent_id: _json(result) for parent_id, result in rows}


def _json(value: Any) -> Any:
    import json

    return json.loads(value) if isinstance(value, str) else value


# --- Batches ------------------------------------------------------------------------------------


def batch_in_use(batch_id: int | None) -> int | None:
    """The batch a job being deferred joins: the one given, else the one of `with job_batch`."""
    building = _batch.get()
    return batch_id if batch_id is not None else (building.id if building else None)


# The batch's streams hear of its new total (jobs_batches_notify, migration 0010).
_MEMBERS_ADD = """
WITH added AS (UPDATE jobs_batches SET total = total + %s WHERE id = %s AND state = 'open' RETURNING id)
SELECT id, jobs_batches_notify(ARRAY[id]) FROM added
"""


def members_add(batch_id: int | None, count: int) -> None:
    """Count `count` new members (inserted in this transaction). Holds the batch's row lock until
    the transaction ends: members that end meanwhile wait to be counted."""
    if batch_id is None:
        return
    building = _batch.get()
    if building is not None and building.id == batch_id:
        building.members += count
        return
    with connection.cursor() as cursor:
        cursor.execute(_MEMBERS_ADD, [count, batch_id])
        if cursor.fetchone() is None:
            raise ValueError(f"batch {batch_id} is not open (sealed, done or unknown): it takes no new members")


def _callbacks(on_success: JobCall | None, on_failure: JobCall | None, on_complete: JobCall | None) -> dict:
    given = {"on_success": on_success, "on_failure": on_failure, "on_complete": on_complete}
    for call in given.values():
        # A callback is inserted by the batch's trigger (migration 0008), without a concurrency key.
        if call is not None and task_options(call.task.name).concurrency is not None:
            raise ValueError(f"{call.task.name} has a concurrency limit: it cannot be a batch's callback")
    return {name: call.spec() for name, call in given.items() if call is not None}


def job_batch_open(
    *,
    on_success: JobCall | None = None,
    on_failure: JobCall | None = None,
    on_complete: JobCall | None = None,
    owner_id: int | None = None,
    callback_url: str | None = None,
    name: str = "",
    key: str | None = None,
) -> int:
    """Create an open batch and return its id; add members with `job_defer(..., batch_id=id)` in
    this or later transactions, then `job_batch_seal(id)`.

    - `owner_id`: the user it works for (the jobs API shows it to them; the callback jobs are
      theirs too).
    - `callback_url`: the completion webhook of each callback job (signed with the owner's secret).
    - `key`: a unique name; opening a batch whose key exists returns that batch's id.
    """
    if callback_url:
        webhook_callback_check(callback_url, owner_id=owner_id)
    defaults = {
        "callbacks": _callbacks(on_success, on_failure, on_complete),
        "owner_id": owner_id,
        "callback_url": callback_url or "",
        "name": name,
    }
    if key is None:
        return JobBatch.objects.create(**defaults).id
    batch, _ = JobBatch.objects.get_or_create(key=key, defaults=defaults)
    return batch.id


_SEAL = """
WITH sealed AS (UPDATE jobs_batches SET state = 'sealed' WHERE id = %s AND state = 'open' RETURNING id)
SELECT jobs_batches_complete(array_agg(id)) FROM sealed
"""


def job_batch_seal(batch_id: int) -> None:
    """No more members: the batch completes once every member has ended (at once if they have).
    Sealing a sealed or done batch changes nothing."""
    with connection.cursor() as cursor:
        cursor.execute(_SEAL, [batch_id])


@dataclass(frozen=True)
class Batch:
    id: int


@contextmanager
def job_batch(
    *,
    on_success: JobCall | None = None,
    on_failure: JobCall | None = None,
    on_complete: JobCall | None = None,
    owner_id: int | None = None,
    callback_url: str | None = None,
    name: str = "",
) -> Iterator[Batch]:
    """A batch built in one transaction: the jobs deferred inside the block join it, and it is
    sealed when the block ends (an empty batch completes at once). An exception rolls back the
    batch and its members."""
    with transaction.atomic():
        batch_id = job_batch_open(
            on_success=on_success,
            on_failure=on_failure,
            on_complete=on_complete,
            owner_id=owner_id,
            callback_url=callback_url,
            name=name,
        )
        building = _BuildingBatch(batch_id)
        token = _batch.set(building)
        try:
            yield Batch(batch_id)
        finally:
            _batch.reset(token)
        members_add(batch_id, building.members)
        job_batch_seal(batch_id)


@dataclass(frozen=True)
class BatchCounts:
    id: int
    state: str
    total: int
    succeeded: int
    failed: int
    cancelled: int
    completions: int
    callback_job_ids: list[int]

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled


def job_batch_counts(*, batch_id: int | None = None, keys: Sequence[str] = ()) -> dict[Any, BatchCounts]:
    """A batch's state and counts, by id (`batch_id`) or by key (`keys`, for many at once)."""
    batches = JobBatch.objects.filter(id=batch_id) if batch_id is not None else JobBatch.objects.filter(key__in=keys)
    found = {}
    for batch in batches:
        counts = BatchCounts(
            batch.id,
            batch.state,
            batch.total,
            batch.succeeded,
            batch.failed,
            batch.cancelled,
            batch.completions,
            list(batch.callback_job_ids),
        )
        found[batch.id if batch_id is not None else batch.key] = counts
    return found
