from django.apps import AppConfig


class LlmConfig(AppConfig):
    name = "llm"
    verbose_name = "LLM usage"

    def ready(self) -> None:
        from core.erasure import erasure_register
        from llm.services import llm_erase_owner

        erasure_register("llm", llm_erase_owner)
