from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Job system"

    def ready(self) -> None:
        from core.erasure import erasure_register
        from jobs.erasure import jobs_erase_owner

        erasure_register("jobs", jobs_erase_owner)
