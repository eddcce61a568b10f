"""Claude through the official SDK, behind one `complete()` that raises one error type.

The SDK's own retries are off: retrying is the job system's business (backoff, attempts and
the failure record live in PostgreSQL), so a transient error surfaces at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import anthropic
import httpx2
from django.conf import settings

from core.errors import ProviderError
from core.tracing import provider_span
from llm import pricing

__all__ = ["ClaudeClient", "Completion", "ProviderTimedOut", "estimate_input_tokens"]


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    input_tokens: int
    output_tokens: int

    @property
    def cost_usd(self) -> Decimal:
        return pricing.cost_usd(model=self.model, input_tokens=self.input_tokens, output_tokens=self.output_tokens)


def estimate_input_tokens(*, system: str, prompt: str) -> int:
    """An upper estimate of a request's input tokens, without asking the API: one token per
    three bytes of UTF-8 (English averages about four characters a token, CJK about one
    character, three bytes) plus the message framing."""
    return math.ceil(len((system + prompt).encode()) / 3) + 16


class ProviderTimedOut(ProviderError):
    """The request reached Claude but no answer came in time: Claude may have billed it.

    Carries the worst case, the request's estimated input and every output token it allowed,
    for the ledger (llm.services)."""

    def __init__(self, message: str, *, model: str, input_tokens: int, output_tokens: int) -> None:
        super().__init__(message, permanent=False)
        self.usage = Completion(text="", model=model, input_tokens=input_tokens, output_tokens=output_tokens)


# 408 request timeout, 409 conflict, 429 rate limited, 5xx and 529 overloaded: try again later.
_TRANSIENT_STATUSES = {408, 409, 429}


class ClaudeClient:
    def __init__(self, *, api_key: str, base_url: str, model: str, timeout: float) -> None:
        self.model = model
        self._host = httpx2.URL(base_url).host
        self._client = anthropic.Anthropic(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)

    @classmethod
    def from_settings(cls) -> ClaudeClient:
        return cls(
            api_key=settings.ANTHROPIC_API_KEY,
            base_url=settings.ANTHROPIC_BASE_URL,
            model=settings.ANTHROPIC_MODEL,
            timeout=settings.ANTHROPIC_TIMEOUT_SECONDS,
        )

    def complete(self, *, system: str, prompt: str, max_tokens: int = 1024) -> Completion:
        # A span of the job's trace when tracing is on (core/tracing.py); no prompt text in it.
        with provider_span(
            "claude messages.create",
            **{"gen_ai.system": "anthropic", "gen_ai.request.model": self.model, "server.address": self._host},
        ) as span:
            completion = self._complete(system=system, prompt=prompt, max_tokens=max_tokens)
            if span is not None:
                span.set_attribute("gen_ai.usage.input_tokens", completion.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", completion.output_tokens)
            return completion

    def _complete(self, *, system: str, prompt: str, max_tokens: int) -> Completion:
        try:
            message = self._client.messages.create(
                model=self.model,
                max_tokens=max_tokens,
                system=system,
                messages=[{"role": "user", "content": prompt}],
            )
        except anthropic.APITimeoutError as exc:
            # Only a read timeout comes after the whole request went out; a connect, pool or
            # write timeout never reached the model.
            if isinstance(exc.__cause__, httpx2.ReadTimeout):
                raise ProviderTimedOut(
                    "Claude did not answer in time",
                    model=self.model,
                    input_tokens=estimate_input_tokens(system=system, prompt=prompt),
                    output_tokens=max_tokens,
                ) from exc
            raise ProviderError(f"Claude unreachable: {type(exc).__name__}", permanent=False) from exc
        except anthropic.APIConnectionError as exc:
            raise ProviderError(f"Claude unreachable: {type(exc).__name__}", permanent=False) from exc
        except anthropic.APIStatusError as exc:
            transient = exc.status_code in _TRANSIENT_STATUSES or exc.status_code >= 500
            # `from None`: the SDK's error holds the provider's message, which may quote the
            # prompt (the user's notes) back, and a chained cause is printed in the job's log.
            raise ProviderError(
                f"Claude answered HTTP {exc.status_code} ({_error_type(exc)})", permanent=not transient
            ) from None
        text = "".join(block.text for block in message.content if block.type == "text")
        return Completion(
            text=text,
            model=message.model or self.model,
            input_tokens=message.usage.input_tokens,
            output_tokens=message.usage.output_tokens,
        )


def _error_type(exc: anthropic.APIStatusError) -> str:
    """The error's type from the provider's body ("rate_limit_error"), never its message."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    kind = error.get("type")
    return kind if isinstance(kind, str) and kind.replace("_", "").isalnum() else "unknown error"
