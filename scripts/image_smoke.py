"""The smoke test of `make image-smoke`: docker-compose.yml's services from the built images, then
what a user and an operator see through the web's port. Run by `python scripts/image.py smoke`.

The peers are the tests' own, on 127.0.0.1 (the containers share the host's network): the fake
Claude (tests/peers/claude.py) and the SMTP sink (tests/peers/smtp.py). Every container carries
the label `secondbrain.smoke` and is removed at the end, whatever happened.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable

import yaml

from bench.harness import free_port
from scripts.image import BASE_DIR, LABEL, ContainerSpec, container_specs, log, podman
from tests.peers.claude import FakeClaude
from tests.peers.smtp import SmtpSink

ENRICHMENT = {"type": "idea", "tags": ["smoke"], "summary": "Built and run without a registry.", "connections": []}


class SmokeFailure(Exception):
    pass


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self, wanted: float) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise SmokeFailure("the smoke run's time limit is up")
        return min(wanted, left)


def wait_for(what: str, predicate: Callable[[], object], seconds: float, interval: float = 0.5):
    """predicate()'s first truthy answer within `seconds`, or a SmokeFailure naming `what`."""
    until = time.monotonic() + seconds
    while True:
        answer = predicate()
        if answer:
            return answer
        if time.monotonic() >= until:
            raise SmokeFailure(f"{what}: not within {seconds:.0f} s")
        time.sleep(interval)


class Containers:
    """The smoke run's containers: started from their specs, checked, removed together."""

    def __init__(self, deadline: Deadline, slack: float) -> None:
        self.slack = slack
        self.label = str(os.getpid())  # the run's: its containers are removed with it
        self.prefix = f"secondbrain-smoke-{self.label}"
        self.deadline = deadline
        self.started: list[ContainerSpec] = []

    def start(self, spec: ContainerSpec) -> None:
        result = podman(*spec.run_args(self.label), check=False, env={**os.environ, **spec.environment})
        if result.returncode != 0:
            raise SmokeFailure(f"podman run {spec.name}: {result.stderr.strip()}")
        self.started.append(spec)
        log(f"started {spec.name} ({spec.service})")

    def healthy(self, spec: ContainerSpec) -> None:
        """Its compose health check (`podman exec`) passes within the start period and retries.
        Each try gets the check's timeout times `slack` (a loaded machine starts Python slowly)
        and is killed inside the container when it runs out, as Docker kills a check: a check
        left running would slow down the next."""
        check = spec.healthcheck
        assert check is not None
        limit = check.timeout * self.slack
        begun = time.monotonic()

        def passes() -> bool:
            if self.state(spec.name) != "running":
                raise SmokeFailure(f"{spec.name} is {self.state(spec.name)}, not running")
            test = ["timeout", "--signal", "KILL", f"{limit:.0f}", *check.test]
            try:
                result = podman("exec", spec.name, *test, check=False, timeout=limit + 10)
            except subprocess.TimeoutExpired:
                return False
            return result.returncode == 0

        budget = check.start_period + check.retries * (check.interval + limit)
        wait_for(f"{spec.name} healthy", passes, self.deadline.left(budget), interval=1.0)
        log(f"{spec.name} healthy after {time.monotonic() - begun:.1f} s")

    def completed(self, spec: ContainerSpec, seconds: float = 300.0) -> None:
        """A one-shot container (migrate) exits 0."""
        begun = time.monotonic()
        allowed = self.deadline.left(seconds)
        try:
            result = podman("wait", spec.name, timeout=allowed)
        except subprocess.TimeoutExpired as exc:
            raise SmokeFailure(f"{spec.name} still running after {allowed:.0f} s") from exc
        code = result.stdout.strip()
        if code != "0":
            raise SmokeFailure(f"{spec.name} exited with {code}")
        log(f"{spec.name} completed (exit 0) in {time.monotonic() - begun:.1f} s")

    def state(self, name: str) -> str:
        return podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip() or "gone"

    def exit_code(self, name: str) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())

    def print_logs(self, lines: int = 30) -> None:
        for spec in self.started:
            result = podman("logs", "--tail", str(lines), spec.name, check=False)
            print(f"--- {spec.name}: last {lines} lines ---\n{result.stdout}{result.stderr}", flush=True)

    def remove(self) -> int:
        """Remove this run's containers, and those of earlier runs whose process is gone (one
        killed with SIGKILL could not clean up); another run's, still going, stay."""
        listed = podman(
            "ps",
            "--all",
            "--filter",
            f"label={LABEL}",
            "--format",
            f'{{{{.ID}}}} {{{{index .Labels "{LABEL}"}}}}',
            check=False,
        ).stdout.split("\n")
        ids = [line.split()[0] for line in listed if line.strip() and _gone(line.split()[-1], self.label)]
        if ids:
            podman("rm", "--force", "--time", "0", *ids, check=False)
        return len(ids)

    def left(self) -> int:
        return len(
            podman("ps", "--all", "--quiet", "--filter", f"label={LABEL}={self.label}", check=False).stdout.split()
        )


def _gone(label: str, mine: str) -> bool:
    """Whether a container labelled `label` (its run's pid) may be removed by run `mine`."""
    if label == mine or not label.isdigit():
        return True
    try:
        os.kill(int(label), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


class Api:
    def __init__(self, port: int) -> None:
        self.port = port
        self.token = ""

    def request(self, method: str, path: str, body: dict | None = None, *, bearer: str = "") -> tuple[int, object]:
        headers = {"Host": "127.0.0.1", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        elif self.token:
            headers["Authorization"] = f"Token {self.token}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode(errors="replace")

    def expect(self, status: int, method: str, path: str, body: dict | None = None, *, bearer: str = "") -> object:
        answered, data = self.request(method, path, body, bearer=bearer)
        if answered != status:
            raise SmokeFailure(f"{method} {path}: {answered} instead of {status}: {str(data)[:300]}")
        return data


def smoke(*, timeout: float, slack: float) -> bool:
    """Start, check, stop, remove. True when every check passed."""
    deadline = Deadline(timeout)
    containers = Containers(deadline, slack)
    leftovers = containers.remove()
    if leftovers:
        log(f"removed {leftovers} container(s) left by an earlier smoke run")
    claude = FakeClaude().start()
    sink = SmtpSink().start()
    try:
        ports = {"postgres": free_port(), "web": free_port()}
        env = {
            "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
            "SECRET_KEY": secrets.token_urlsafe(50),
            "METRICS_TOKEN": secrets.token_urlsafe(24),
            "EMAIL_URL": f"smtp://127.0.0.1:{sink.port}",
            "ANTHROPIC_API_KEY": "smoke-key",
            "WORKERS": "2",
        }
        compose = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())
        specs = container_specs(compose, env, ports=ports, prefix=containers.prefix)
        for spec in specs:
            if spec.service != "postgres":  # not in the compose file: Claude's address
                spec.environment["ANTHROPIC_BASE_URL"] = claude.base_url
        log(f"postgres on 127.0.0.1:{ports['postgres']}, web on 127.0.0.1:{ports['web']}")
        _up(containers, specs, compose)
        api = Api(ports["web"])
        _check(api, containers, env, claude, sink)
        _stop(containers, [s for s in specs if s.service in ("worker", "web")])
        return True
    except SmokeFailure as exc:
        log(f"FAILED: {exc}")
        containers.print_logs()
        return False
    finally:
        removed = containers.remove()
        log(f"removed {removed} container(s); {containers.left()} left")
        claude.stop()
        sink.stop()


def _up(containers: Containers, specs: list[ContainerSpec], compose: dict) -> None:
    """Start in compose's order, each after its depends_on conditions; then every long-running
    container with a health check must turn healthy."""
    done: set[str] = set()
    for spec in specs:
        for dependency, condition in (compose["services"][spec.service].get("depends_on") or {}).items():
            if (dependency, condition["condition"]) in done:
                continue
            for other in (s for s in containers.started if s.service == dependency):
                if condition["condition"] == "service_healthy":
                    containers.healthy(other)
                elif condition["condition"] == "service_completed_successfully":
                    containers.completed(other)
            done.add((dependency, condition["condition"]))
        containers.start(spec)
    for spec in containers.started:
        if spec.healthcheck is not None and not spec.one_shot:
            containers.healthy(spec)


def _check(api: Api, containers: Containers, env: dict[str, str], claude: FakeClaude, sink: SmtpSink) -> None:
    token = env["METRICS_TOKEN"]
    health = api.expect(200, "GET", "/api/health/", bearer=token)
    live = health.get("workers", {}).get("live")
    if health.get("status") != "healthy" or live != 2:
        raise SmokeFailure(f"/api/health/ with the token: {health}")
    log(f"/api/health/: healthy, {live} workers heartbeating")
    metrics = api.expect(200, "GET", "/metrics", bearer=token)
    if "secondbrain_workers_live 2.0" not in str(metrics):
        raise SmokeFailure("/metrics does not say secondbrain_workers_live 2.0")
    api.expect(401, "GET", "/metrics")
    log("/metrics: 200 with the token (2 workers live), 401 without")

    password = secrets.token_urlsafe(16)
    created = podman(
        "exec",
        "--env",
        "DJANGO_SUPERUSER_PASSWORD",
        next(s.name for s in containers.started if s.service == "web"),
        "python",
        "manage.py",
        "createsuperuser",
        "--no-input",
        "--username",
        "smoke",
        "--email",
        "smoke@example.com",
        check=False,
        env={**os.environ, "DJANGO_SUPERUSER_PASSWORD": password},
    )
    if created.returncode != 0:
        raise SmokeFailure(f"createsuperuser: {created.stderr.strip()}")
    api.token = api.expect(200, "POST", "/api/auth/token/", {"username": "smoke", "password": password})["token"]

    claude.answer_json(ENRICHMENT)
    note = api.expect(201, "POST", "/api/notes/", {"content": "A note from the image's smoke test."})

    def enriched() -> dict | None:
        current = api.expect(200, "GET", f"/api/notes/{note['id']}/")
        if current["enrichment_status"] in ("failed", "skipped"):
            raise SmokeFailure(f"note enrichment {current['enrichment_status']}: {current['enrichment_error']}")
        return current if current["enrichment_status"] == "done" else None

    begun = time.monotonic()
    current = wait_for("the note enriched", enriched, containers.deadline.left(60))
    if current["summary"] != ENRICHMENT["summary"] or len(claude.message_requests) != 1:
        raise SmokeFailure(f"enriched note {current}, {len(claude.message_requests)} Claude request(s)")
    log(f"note {note['id']} enriched by a worker via the fake Claude in {time.monotonic() - begun:.1f} s")

    recipient = api.expect(201, "POST", "/api/recipients/", {"name": "Rita", "email": "rita@example.com"})
    sent = api.expect(
        202,
        "POST",
        "/api/notifications/send-email/",
        {"recipient_id": recipient["id"], "subject": "Smoke", "body": "Hello from the image."},
    )
    begun = time.monotonic()
    wait_for("the e-mail at the SMTP sink", lambda: sink.messages, containers.deadline.left(60))

    def finished() -> dict | None:
        job = api.expect(200, "GET", f"/api/notifications/jobs/{sent['notification_id']}/")
        return job if job["status"] not in ("pending", "processing") else None

    job = wait_for("the notification finished", finished, containers.deadline.left(30))
    time.sleep(2)  # a second delivery would come from a retry or a second worker: give it time
    messages = sink.messages
    if job["status"] != "sent" or len(messages) != 1 or messages[0]["X-Envelope-To"] != "rita@example.com":
        raise SmokeFailure(f"notification {job['status']}, {len(messages)} message(s) at the sink")
    log(f"e-mail delivered once to the SMTP sink in {time.monotonic() - begun:.1f} s, status sent")


def _stop(containers: Containers, specs: list[ContainerSpec]) -> None:
    """SIGTERM (podman stop): the workers, then the web, each exits 0 within its
    stop_grace_period (a container still running then is killed: 137)."""
    for spec in sorted(specs, key=lambda spec: spec.service == "web"):
        begun = time.monotonic()
        podman("stop", "--time", str(round(spec.stop_grace_seconds)), spec.name, timeout=spec.stop_grace_seconds + 30)
        took = time.monotonic() - begun
        code = containers.exit_code(spec.name)
        if code != 0 or took >= spec.stop_grace_seconds:
            raise SmokeFailure(f"{spec.name}: exit {code} after {took:.1f} s (grace {spec.stop_grace_seconds:.0f} s)")
        log(f"{spec.name}: SIGTERM, exit 0 in {took:.1f} s (grace {spec.stop_grace_seconds:.0f} s)")
