"""The task author's toolkit: declaring tasks (`job_task`), deferring them, progress, retries, time
and rate limits, circuit breakers, completion webhooks and the queue names. Apps import it from
`jobs` (see jobs/__init__.py), not from here.
"""
