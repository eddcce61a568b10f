"""The engine: what runs jobs. Procrastinate's worker, job manager and pool, overridden for batched
claims, paused queues, outages and the middleware around every job. Apps never import it.
"""
