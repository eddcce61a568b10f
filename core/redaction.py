"""Secrets and e-mail addresses out of what operators read: log lines and job errors.

Jobs carry ids, never personal data (STYLE.md), and providers' errors are turned into short
messages of our own. But some text comes from outside as it is: a mail server's reply names
the refused address, and an exception's traceback shows what a library put in it. Every log
record (through the console handler's filter) and every stored job error pass through
`redact`: configured secrets and anything shaped like an API key or an e-mail address are
replaced by a placeholder. The users' own rows (their notifications' delivery logs) keep the
full text.
"""

from __future__ import annotations

import logging
import re

from django.conf import settings

# local@domain.tld, with a letter TLD so that "postgres@127.0.0.1" (a database URL) stays.
# Every run of local-part characters is one match, with the "@domain" after it when there is
# one (then it is an address). Searching for `local+@domain` alone restarted at each character
# of a run without "@" and scanned to its end: quadratic, minutes for a 300 KB log line.
# Matching the whole run and going on after it finds the same addresses, because a local part
# is always the rest of its run up to the "@" ("@" is not a local-part character).
EMAIL_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+(?P<domain>@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})?")
API_KEY = re.compile(r"\bsk-ant-[A-Za-z0-9_-]{8,}")
SECRET_SETTINGS = (
    "ANTHROPIC_API_KEY",
    "EMAIL_HOST_PASSWORD",
    "SECRET_KEY",
    "METRICS_TOKEN",
    "JOBS_WEBHOOK_SECRET",
)


def redact(text: str) -> str:
    """`text` without the configured secrets, API keys and e-mail addresses."""
    for name in SECRET_SETTINGS:
        secret = getattr(settings, name, "")
        if isinstance(secret, str) and len(secret) >= 8 and secret in text:
            text = text.replace(secret, f"[{name}]")
    text = API_KEY.sub("[api key]", text)
    if "@" not in text:
        return text
    return EMAIL_ADDRESS.sub(_email_placeholder, text)


def _email_placeholder(match: re.Match[str]) -> str:
    return "[e-mail]" if match["domain"] else match[0]


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and traceback through `redact` (installed on the handlers
    in settings.LOGGING, so it covers every logger, Procrastinate's and libraries' too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
