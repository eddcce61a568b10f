"""Complexity checks for text handling: a function on hostile 100 KB inputs, each within seconds.

A quadratic regular expression takes minutes on these inputs (a `^\\s*` under MULTILINE over
100 KB of newlines: about 10 minutes), a linear one milliseconds. The function runs in a child
process that the test kills at its deadline: a regular expression cannot be interrupted inside
the process, and a stuck test must not hold the suite for minutes.

    assert_linear_on_hostile_text("from notes.tier1 import analyse", "analyse(text)")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import BASE_DIR

SIZE = 100_000
# Per input; linear code needs milliseconds, today's quadratic patterns need minutes.
SECONDS_PER_INPUT = 2.0
STARTUP_SECONDS = 30.0


def hostile_texts(size: int = SIZE) -> dict[str, str]:
    """The worst inputs found for the project's patterns, each about `size` characters."""
    unit = {
        "newlines": "\n",
        "spaces": " ",
        "blank lines of mixed whitespace": " \t\n\r\x0b\x0c",
        "hashes": "#",
        "open task boxes": "-[",
        "dashes on lines": "-\n",
        "quote markers after blank lines": "\n\n>",
        "letters": "a",
        "at signs": "a@",
        "dots": ".",
        "open braces": "{",
        "api key prefixes": "sk-ant-",
        "scheme prefixes": "http:/",
        "carriage returns": "\r",
    }
    texts = {name: "a" + piece * (size // len(piece)) + "x" for name, piece in unit.items()}
    texts["a 100 KB URL"] = "https://example.com/" + "a" * size
    texts["a 100 KB URL of dots"] = "http://" + "." * size
    texts["a domain that never ends"] = "user@" + "a1." * (size // 3)
    texts["an e-mail local part that never ends"] = "a." * (size // 2) + "@"
    texts["a hashtag run"] = "#a" * (size // 2)
    texts["a JSON object that never closes"] = '{"a": ' * (size // 6)
    texts["all of these mixed"] = "".join(
        (piece * (size // len(piece) // len(unit)) for piece in unit.values()),
    )
    return texts


_CHILD = """
import json, sys, time
import django
django.setup()
from tests.complexity import hostile_texts
exec(sys.argv[1])
call = compile(sys.argv[2], "<call>", "eval")
for label, text in hostile_texts(int(sys.argv[3])).items():
    started = time.perf_counter()
    try:
        eval(call)
    except Exception:
        pass  # refusing the input is fine; only the time counts
    print(json.dumps([label, time.perf_counter() - started]), flush=True)
"""


def assert_linear_on_hostile_text(setup: str, call: str, *, size: int = SIZE) -> None:
    """Run `call` (an expression of `text`, after `setup`) on every hostile text of `size`
    characters; fail when one takes over SECONDS_PER_INPUT, or when the child is still busy at
    the deadline. Choose `size` so that a quadratic pattern misses the bound a hundredfold."""
    labels = list(hostile_texts(10))
    deadline = STARTUP_SECONDS + SECONDS_PER_INPUT * len(labels)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "config.settings")}
    try:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, setup, call, str(size)],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=deadline,
        )
        output, error = result.stdout, result.stderr
        assert result.returncode == 0, error
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        error = f"still busy after {deadline:g} s"
    seconds = dict(json.loads(line) for line in output.splitlines() if line.startswith("["))
    unfinished = [label for label in labels if label not in seconds]
    assert not unfinished, f"{call} on {unfinished[0]!r} ({size} characters): {error}"
    slow = {label: round(taken, 2) for label, taken in seconds.items() if taken > SECONDS_PER_INPUT}
    assert not slow, f"{call} took over {SECONDS_PER_INPUT:g} s on {slow}"
