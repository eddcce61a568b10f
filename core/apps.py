from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Core"

    def ready(self) -> None:
        from core.erasure import erasure_connect
        from core.tracing import tracing_setup

        erasure_connect()
        tracing_setup()
