"""scripts/image.py's parts that need no podman: docker-compose.yml read into containers, the
containers.conf edit, the host's apt and pip settings carried into the build."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from scripts import image
from tests.helpers import BASE_DIR

COMPOSE = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())
ENV = {"POSTGRES_PASSWORD": "pw", "SECRET_KEY": "s" * 50, "EMAIL_URL": "smtp://127.0.0.1:2525", "METRICS_TOKEN": "t"}
PORTS = {"postgres": 15432, "web": 18000}


def _specs(**env: str) -> dict[str, image.ContainerSpec]:
    return {spec.name: spec for spec in image.container_specs(COMPOSE, {**ENV, **env}, ports=PORTS, prefix="x")}


def test_the_compose_services_become_containers_in_start_order_with_the_workers_replicated():
    specs = _specs()
    assert list(specs) == ["x-postgres", "x-migrate", "x-web", "x-worker-1", "x-worker-2"]
    assert [name for name, spec in specs.items() if spec.one_shot] == ["x-migrate"]
    assert len(_specs(WORKERS="3")) == 6
    assert specs["x-postgres"].image == image.POSTGRES_IMAGE
    assert {spec.image for name, spec in specs.items() if name != "x-postgres"} == {image.APP_IMAGE}


def test_service_addresses_become_the_host_networks_ports_and_secrets_come_from_the_environment():
    specs = _specs()
    worker = specs["x-worker-1"]
    assert worker.environment["DATABASE_URL"] == "postgres://postgres:pw@127.0.0.1:15432/secondbrain"
    assert worker.environment["EMAIL_URL"] == "smtp://127.0.0.1:2525"
    assert worker.environment["WORKER_SHUTDOWN_GRACE_SECONDS"] == "30"
    assert worker.command == ["python", "manage.py", "procrastinate", "worker"]
    postgres = specs["x-postgres"].environment
    assert (postgres["POSTGRES_PASSWORD"], postgres["PGHOST"], postgres["PGPORT"]) == ("pw", "127.0.0.1", "15432")
    # Values reach podman by name only (--env NAME), never on its command line.
    args = worker.run_args("run1")
    assert "pw" not in " ".join(args) and args[args.index("DATABASE_URL") - 1] == "--env"
    with pytest.raises(SystemExit, match="SECRET_KEY: set SECRET_KEY"):
        image.container_specs(COMPOSE, {**ENV, "SECRET_KEY": ""}, ports=PORTS)


def test_the_web_serves_the_images_command_on_its_port_and_health_checks_ask_it():
    web = _specs()["x-web"]
    assert web.command[:4] == ["python", "-m", "gunicorn", "config.asgi:application"]
    assert web.command[web.command.index("--bind") + 1] == "127.0.0.1:18000"
    assert web.healthcheck.test == ["python", "scripts/web_health.py", "18000"]
    worker = _specs()["x-worker-1"]
    assert worker.healthcheck.test == ["python", "manage.py", "jobs_worker_health"]
    assert (worker.stop_grace_seconds, web.stop_grace_seconds) == (45, 40)
    assert _specs()["x-postgres"].healthcheck.test == ["sh", "-c", "pg_isready -U postgres -d secondbrain"]


def test_compose_interpolation_and_durations():
    assert image.interpolate("${A:-x}/${B-y}/${C}", {"A": "", "B": ""}) == "x//"
    assert image.interpolate("${A:?}", {"A": "1"}) == "1"
    with pytest.raises(SystemExit, match="A: required"):
        image.interpolate("${A?}", {})
    assert image.seconds("1m30s") == 90 and image.seconds("500ms") == 0.5 and image.seconds(3) == 3


@pytest.mark.parametrize(
    ("before", "after", "what"),
    [
        (None, "[containers]\ndefault_ulimits = []\n", "written"),
        (
            "[engine]\nx = 1\n",
            "[engine]\nx = 1\n\n[containers]\ndefault_ulimits = []\n",
            "added a [containers] section",
        ),
        ("[containers]\nlog_size_max = 1\n[engine]\n", None, "added under [containers]"),
        ('[containers]\ndefault_ulimits = ["nofile=1024:1024"]\n', "unchanged", "already set"),
        (
            "[engine]\ndefault_ulimits = []\n",
            "[engine]\ndefault_ulimits = []\n\n[containers]\ndefault_ulimits = []\n",
            "added",
        ),
    ],
)
def test_containers_conf_gets_default_ulimits_only_where_it_is_not_set(before, after, what):
    text, done = image.containers_conf_with_ulimits(before)
    assert done.startswith(what)
    if after == "unchanged":
        assert text == before
    elif after is not None:
        assert text == after
    else:
        assert text == "[containers]\ndefault_ulimits = []\nlog_size_max = 1\n[engine]\n"


def test_the_debian_mirror_comes_from_apts_sources_in_either_format():
    deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    security = "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    assert image.debian_mirror({"debian.sources": security + "\n" + deb822}) == "http://mirror.example/debian"
    line = "# a comment\ndeb [arch=amd64] http://other.example/debian bookworm main\n"
    assert image.debian_mirror({"sources.list": line}) == "http://other.example/debian"
    with pytest.raises(SystemExit):
        image.debian_mirror({"sources.list": "deb http://x/debian trixie main\n"})


def test_the_hosts_pip_indexes_and_their_local_directories_go_into_the_build(tmp_path):
    (tmp_path / "pypi" / "simple").mkdir(parents=True)
    listed = (
        f"global.extra-index-url='file://{tmp_path}/pypi/simple file:///nowhere/simple'\n"
        "global.cert='/etc/ssl/certs/ca-certificates.crt'\nglobal.constraint='/etc/x.txt'\n"
        ":env:.default-timeout='180'\n"
    )
    settings = image.pip_settings(listed, {"PIP_FIND_LINKS": str(tmp_path), "https_proxy": "http://proxy:3128"})
    assert settings == {
        "extra-index-url": f"file://{tmp_path}/pypi/simple file:///nowhere/simple",
        "default-timeout": "180",
        "find-links": str(tmp_path),
        "proxy": "http://proxy:3128",
    }
    assert image.local_index_dirs(settings) == [str(tmp_path / "pypi"), str(tmp_path)]


def test_the_dockerfile_takes_the_local_base_as_its_build_argument():
    dockerfile = (BASE_DIR / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm\nFROM ${BASE_IMAGE}\n" in dockerfile
    assert image.BASE_IMAGE.startswith("localhost/")  # podman never looks it up in a registry


def test_a_smoke_run_removes_its_own_containers_and_those_of_runs_that_are_gone():
    from scripts import image_smoke

    finished = subprocess.Popen(["true"])
    finished.wait()
    assert image_smoke._gone("123", "123")  # its own
    assert image_smoke._gone(str(finished.pid), "123")  # a run killed before it could clean up
    assert not image_smoke._gone(str(os.getpid()), "123")  # another run, still going
