"""Fair claims (jobs/tasking/fairness.py): owners take turns, a user's priority orders only their
own work, the service band goes first, nothing starves. Jobs are deferred the way the apps
defer them (job_defer, job_defer_bulk) and claimed the way a worker claims them; the last
tests run real worker processes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from django.db import connection

from jobs import SERVICE_PRIORITY
from jobs.engine.connector import PREPARE_THRESHOLD
from jobs.tasking.defer import job_defer, job_defer_bulk
from notifications.services import notification_send_email
from tests.factories import make_recipient, make_user
from tests.helpers import claim_jobs, stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_status, query, start_test_worker

pytestmark = pytest.mark.django_db(transaction=True)

URGENT, NORMAL = 30, 10  # the notifications API's job priorities for "urgent" and "normal"


def _backlog(owner, count: int, *, priority: int = NORMAL) -> list[int]:
    return job_defer_bulk(tasks.stamp_a, [{"n": i} for i in range(count)], owner_id=owner.pk, priority=priority)


def _owners(job_ids: list[int]) -> Counter:
    rows = query("SELECT owner_id FROM jobs_job_info WHERE job_id = ANY(%s)", [job_ids])
    return Counter(row[0] for row in rows)


def test_a_single_job_is_claimed_in_the_first_batch_behind_a_backlog_of_another_owner():
    alice, bob = make_user("alice"), make_user("bob")
    for _ in range(20):
        _backlog(alice, 1000)
    bobs = job_defer(tasks.stamp_a, owner_id=bob.pk, priority=NORMAL, n=1)

    assert bobs in claim_jobs(limit=10)


def test_with_fair_claims_off_the_single_job_waits_behind_the_backlog(settings):
    # The reference the benchmark compares against: the claim in priority then age order.
    settings.JOBS_FAIR_CLAIMS = False
    alice, bob = make_user("alice"), make_user("bob")
    _backlog(alice, 100)
    bobs = job_defer(tasks.stamp_a, owner_id=bob.pk, priority=NORMAL, n=1)

    assert bobs not in claim_jobs(limit=10)


def test_owners_take_turns_job_for_job():
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    _backlog(alice, 30)
    _backlog(bob, 30)
    _backlog(carol, 30)

    for _ in range(3):
        assert _owners(claim_jobs(limit=9)) == {alice.pk: 3, bob.pk: 3, carol.pk: 3}


def test_the_owners_of_one_bulk_defer_take_turns():
    alice, bob = make_user("alice"), make_user("bob")
    ids = job_defer_bulk(tasks.stamp_a, [{"n": i} for i in range(41)], owner_id=[alice.pk] * 40 + [bob.pk])

    claimed = claim_jobs(limit=2)
    assert _owners(claimed) == {alice.pk: 1, bob.pk: 1}
    assert set(claimed) == {ids[0], ids[40]}


def test_an_owner_starting_again_takes_turns_with_a_backlog_already_served_for_a_while():
    # Carol's line has had half its turns; Alice's new line starts at the queue's head and
    # takes turns with the rest of it, rather than going ahead of all of it.
    alice, carol = make_user("alice"), make_user("carol")
    _backlog(carol, 100)
    for _ in range(5):
        claim_jobs(limit=10)
    _backlog(alice, 30)

    assert _owners(claim_jobs(limit=10)) == {alice.pk: 5, carol.pk: 5}


def test_jobs_without_an_owner_are_one_more_owner():
    alice = make_user("alice")
    _backlog(alice, 50)
    ownerless = [job_defer(tasks.stamp_a, n=i) for i in range(3)]

    claimed = claim_jobs(limit=4)
    assert len(set(claimed) & set(ownerless)) == 2  # taking turns with alice, job for job


def test_a_users_urgent_jobs_do_not_go_ahead_of_another_users_turn():
    alice, bob = make_user("alice"), make_user("bob")
    _backlog(alice, 200, priority=URGENT)
    bobs = job_defer(tasks.stamp_a, owner_id=bob.pk, priority=NORMAL, n=1)

    assert bobs in claim_jobs(limit=2)


def test_a_users_urgent_job_does_not_wait_behind_their_own_backlog():
    alice = make_user("alice")
    backlog = _backlog(alice, 200, priority=NORMAL)
    urgent = job_defer(tasks.stamp_a, owner_id=alice.pk, priority=URGENT, n=1)

    claimed = claim_jobs(limit=2)
    assert claimed == [urgent, backlog[0]]  # started first within the claim: the higher priority


def test_the_service_band_goes_ahead_of_every_users_turn():
    alice, bob = make_user("alice"), make_user("bob")
    _backlog(alice, 50)
    job_defer(tasks.stamp_a, owner_id=bob.pk, priority=NORMAL, n=1)
    service = job_defer(tasks.stamp_a, priority=SERVICE_PRIORITY, n=2)
    staff_urgent = job_defer(tasks.stamp_a, owner_id=bob.pk, priority=SERVICE_PRIORITY + 30, n=3)

    assert claim_jobs(limit=2) == [staff_urgent, service]


def test_a_users_urgent_email_stays_in_their_own_work_and_a_staff_members_does_not():
    user, staff = make_user("rita"), make_user("ops", is_staff=True)
    mine = notification_send_email(
        owner=user,
        recipient=make_recipient(user),
        subject="s",
        body="b",
        notification_type="system",
        priority="urgent",
    )
    theirs = notification_send_email(
        owner=staff,
        recipient=make_recipient(staff),
        subject="s",
        body="b",
        notification_type="system",
        priority="urgent",
    )
    priorities = dict(
        query(
            "SELECT id, priority FROM procrastinate_jobs WHERE id = ANY(%s)",
            [[mine.procrastinate_job_id, theirs.procrastinate_job_id]],
        )
    )
    assert priorities[mine.procrastinate_job_id] < SERVICE_PRIORITY <= priorities[theirs.procrastinate_job_id]


def test_a_backlog_is_not_starved_by_other_owners_that_keep_deferring(settings):
    # Every round other owners defer as many jobs as a claim takes, so the queue never drains;
    # Alice's backlog still gets its turns (the clock alone would give her one every 3 defers).
    settings.JOBS_FAIR_DEFERS_PER_ROUND = 3
    alice = make_user("alice")
    others = [make_user(f"user{n}") for n in range(5)]
    backlog = set(_backlog(alice, 10))

    for round_number in range(60):
        for user in others[round_number % 5 : round_number % 5 + 1]:
            _backlog(user, 2)
        backlog -= set(claim_jobs(limit=2))
        if not backlog:
            break
    assert not backlog, f"{len(backlog)} of alice's 10 jobs still waiting after 60 rounds"


def test_a_retried_job_keeps_its_place():
    alice, bob = make_user("alice"), make_user("bob")
    [first, *_] = _backlog(alice, 20)
    [claimed] = claim_jobs(limit=1)
    assert claimed == first
    _backlog(bob, 20)
    query("UPDATE procrastinate_jobs SET status = 'todo', worker_id = NULL WHERE id = %s", [first])

    assert first in claim_jobs(limit=1)


@pytest.mark.parametrize("fair", [True, False])
def test_with_real_workers_the_single_job_starts_in_the_first_batch(fair):
    alice, bob = make_user("alice"), make_user("bob")
    _backlog(alice, 300)
    bobs = job_defer(tasks.stamp_a, owner_id=bob.pk, priority=NORMAL, n=1)
    env = {"JOBS_FAIR_CLAIMS": "true" if fair else "false"}
    worker = start_test_worker("--queues", tasks.QUEUE_A, "--concurrency", "10", env=env)
    try:
        wait_for(lambda: job_status(bobs) == "succeeded", timeout=120, what="bob's job")
    finally:
        output = stop_worker(worker)
    [(started_before,)] = query(
        "SELECT count(*) FROM procrastinate_events WHERE type = 'started'"
        " AND id < (SELECT id FROM procrastinate_events WHERE job_id = %s AND type = 'started')",
        [bobs],
    )
    if fair:
        assert started_before < 10, output  # in the worker's first claim of 10
    else:
        assert started_before == 300, output  # behind the whole backlog


def test_the_clock_is_the_sequence_of_procrastinates_job_ids():
    # jobs/tasking/fairness.py reads it by name: a Procrastinate schema that renamed it would
    # leave every round without its clock.
    [(sequence,)] = query("SELECT pg_get_serial_sequence('procrastinate_jobs', 'id')")
    assert sequence == "public.procrastinate_jobs_id_seq"


def _shared_buffers_of_each_statement(defer, times: int) -> list[int]:
    """Run `defer` `times` times, each of its statements under EXPLAIN (ANALYZE, BUFFERS) in its
    place: the shared buffers each touched, the functions it called included."""
    touched = []

    def explain(execute, sql, params, many, context):
        execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params, many, context)
        plan = context["cursor"].fetchone()[0]
        plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]
        touched.append(plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"])

    with connection.execute_wrapper(explain):
        for _ in range(times):
            defer()
    return touched


@pytest.mark.parametrize("bulk", [False, True], ids=["one", "bulk"])
def test_a_defer_after_an_empty_queue_reads_a_few_index_entries_for_its_round(bulk):
    """After ANALYZE saw no waiting job (a queue that drained), PostgreSQL expects none, and
    planned the round's lookups (the queue's head, the line's last round) as a read of every
    waiting job through another partial index and a sort: each defer read the whole backlog,
    quadratic in a burst (`bench`: 1.5 ms a defer at its start, 6.4 ms at 14,000 jobs waiting).
    Both defers, custom plans and then the prepared one, must stay a few index steps."""
    # A queue that drained: its jobs ran and were deleted, and ANALYZE saw none left (no row per
    # page, where a table that never had rows would be estimated from its size).
    burst = (
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, fair_round)"
        " SELECT %s, 'tests.stamp_a', '{}', n FROM generate_series(1, 20000) AS n"
    )
    query(burst, [tasks.QUEUE_A])
    query("DELETE FROM procrastinate_jobs")
    query("ANALYZE procrastinate_jobs")
    query(burst, [tasks.QUEUE_A])  # the next burst
    if bulk:
        touched = _shared_buffers_of_each_statement(
            lambda: job_defer_bulk(tasks.stamp_a, [{"n": i} for i in range(10)]), 2 * PREPARE_THRESHOLD
        )
    else:
        touched = _shared_buffers_of_each_statement(lambda: job_defer(tasks.stamp_a, n=1), 2 * PREPARE_THRESHOLD)
    # Reading the 20,000 waiting jobs touches over 500 buffers per lookup; the insert of ten
    # jobs with their index entries and events about 190.
    assert max(touched) < (400 if bulk else 150), touched
