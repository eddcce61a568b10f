from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Job system"

    def ready(self) -> None:
        # Every process (web, worker, manage.py): the private names of Procrastinate and
        # psycopg_pool the engine relies on are still there, as they were checked (a few ms).
        from jobs.engine import boundary

        boundary.check()

        from core.erasure import erasure_register
        from jobs.tasking.erasure import jobs_erase_owner

        erasure_register("jobs", jobs_erase_owner)
