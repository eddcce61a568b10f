"""The container image without a Docker engine or a registry: `make image`, `make image-smoke`.

    python scripts/image.py build    the base (cached), the PostgreSQL image (cached), the app image
    python scripts/image.py smoke    build, then run docker-compose.yml's services, smoke-test, remove

Podman stands in for Docker (`podman --runtime runc`: crun cannot start containers on machines
that refuse to raise rlimits, and runc needs `default_ulimits = []` in containers.conf). The
public `python:3.11-slim-bookworm` is replaced by a debootstrapped Debian 12 with its Python 3.11
in a virtualenv on PATH (`BASE_IMAGE`, the Dockerfile's build argument); it carries this
machine's CA certificates and pip settings, so the build's `pip install` goes through the same
index and TLS proxy as the host's. PostgreSQL is Debian 12's postgresql-15 in an image on that base.

podman-compose cannot run the compose file here (podman 4.3 runs health checks from systemd
timers, and there is no systemd), so `smoke` reads docker-compose.yml itself and starts the
equivalent containers on the host network, each service on a free port of 127.0.0.1. See
docs/operating.md, "Building and smoke-testing the image without a registry".
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

BASE_IMAGE = "localhost/secondbrain-base:bookworm"
POSTGRES_IMAGE = "localhost/secondbrain-postgres:15"
APP_IMAGE = "localhost/secondbrain:local"  # compose's `image: secondbrain:local`
PODMAN = ["podman", "--runtime", "runc"]
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}  # program: Debian package
# What the Dockerfile needs of its base: python and pip on PATH, useradd (passwd), CA certificates.
# python3-venv, not only python3.11-venv: debootstrap does not resolve the latter's dependency on
# python3.11-distutils, which only python3-distutils provides.
BASE_PACKAGES = ("python3.11", "python3.11-venv", "python3-venv", "ca-certificates", "passwd")
LOG_DIR = BASE_DIR / ".data" / "image"
VENV = "/opt/venv"
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "proxy", "default-timeout")
LABEL = "secondbrain.smoke"
IMPLICIT_PORTS = {"postgres": "5432"}  # where a service's image listens without a `ports:` entry


def log(message: str) -> None:
    print(f"[image {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, **kwargs)


def logged(name: str, args: list[str | Path], *, tail_of: Path | None = None) -> None:
    """Run a long step with its output in .data/image/NAME.log; on failure, its last lines."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    path = LOG_DIR / f"{name}.log"
    with path.open("w") as out:
        done = subprocess.run([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        source = tail_of if tail_of is not None and tail_of.exists() else path
        tail = "\n".join(source.read_text().splitlines()[-20:])
        raise SystemExit(f"{name} failed (exit {done.returncode}; {path.relative_to(BASE_DIR)}):\n{tail}")


def podman(*args: str, check: bool = True, capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], check=check, capture_output=capture, text=True, **kwargs)


# --- the machine ------------------------------------------------------------------------------


def containers_conf_with_ulimits(text: str | None) -> tuple[str, str]:
    """containers.conf with `default_ulimits = []` under [containers], and what was done. A
    value already set there is left alone, whatever it is."""
    text = text or ""
    lines = text.splitlines(keepends=True)
    section = header = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[] ")
            if section == "containers":
                header = index
        elif section == "containers" and re.match(r"default_ulimits\s*=", stripped):
            return text, f"already set ({stripped}), left alone"
    if not text.strip():
        return "[containers]\ndefault_ulimits = []\n", "written"
    if header is not None:
        lines.insert(header + 1, "default_ulimits = []\n")
        return "".join(lines), "added under [containers]"
    return text.rstrip("\n") + "\n\n[containers]\ndefault_ulimits = []\n", "added a [containers] section"


def machine_prepare() -> None:
    """podman, runc and debootstrap installed (as root, from Debian), containers.conf set."""
    if os.geteuid() != 0:
        raise SystemExit("scripts/image.py runs as root (debootstrap, containers.conf, rootful podman)")
    missing = [package for program, package in TOOLS.items() if shutil.which(program) is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise SystemExit(f"missing {', '.join(missing)}: install the Debian packages {' '.join(missing)}")
        log(f"installing {', '.join(missing)} (apt-get)")
        run("apt-get", "install", "-y", "-q", *missing, stdout=subprocess.DEVNULL)
    current = CONTAINERS_CONF.read_text() if CONTAINERS_CONF.exists() else None
    text, what = containers_conf_with_ulimits(current)
    if text != (current or ""):
        CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
        CONTAINERS_CONF.write_text(text)
    log(f"{CONTAINERS_CONF}: default_ulimits {what}")


def debian_mirror(sources: dict[str, str]) -> str:
    """The Debian mirror of apt's sources (file name: text; one-line `deb` or deb822 format)."""
    for name, text in sorted(sources.items()):
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
                if "bookworm" in fields.get("Suites", "").split() and "deb" in fields.get("Types", ""):
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1]
    raise SystemExit("no Debian bookworm mirror in /etc/apt/sources.list(.d)")


def apt_sources() -> dict[str, str]:
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    return {p.name: p.read_text() for p in paths if p.is_file() and p.suffix in (".list", ".sources")}


def pip_settings(config_list: str, environ: dict[str, str]) -> dict[str, str]:
    """The host's pip settings that reach an index (`pip config list` output, then PIP_*
    variables, which win, as in pip), without the host-only ones (cert, constraint)."""
    settings: dict[str, str] = {}
    for line in config_list.splitlines():
        found = re.match(r"^[\w:.-]*?\.([\w-]+)='(.*)'$", line.strip())
        if found and found.group(1) in PIP_KEYS:
            settings[found.group(1)] = found.group(2)
    for key in PIP_KEYS:
        value = environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            settings[key] = value
    for variable in ("https_proxy", "HTTPS_PROXY"):
        if environ.get(variable) and "proxy" not in settings:
            settings["proxy"] = environ[variable]
    return settings


def local_index_dirs(settings: dict[str, str]) -> list[str]:
    """The host directories the pip settings name (file:// indexes, find-links paths), mounted
    read-only into the build. An index's `simple/` links to its sibling files: mount its parent."""
    dirs: list[str] = []
    for key in ("index-url", "extra-index-url", "find-links"):
        for value in settings.get(key, "").split():
            path = value.removeprefix("file://") if value.startswith("file://") else value
            if not path.startswith("/"):
                continue
            path = path.rstrip("/")
            if path.endswith("/simple"):
                path = path.removesuffix("/simple")
            if Path(path).exists() and path not in dirs:
                dirs.append(path)
    return dirs


def _host_pip_settings() -> dict[str, str]:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    return pip_settings(listed, dict(os.environ))


# --- the images -------------------------------------------------------------------------------


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def base_build() -> None:
    """Debian 12 (debootstrap, minbase) with Python 3.11 in a virtualenv on PATH, as
    `python:3.11-slim` has python and pip on PATH, the host's CA certificates and pip settings."""
    mirror = debian_mirror(apt_sources())
    log(f"base: debootstrap bookworm from {mirror} (a few minutes)")
    root = Path(tempfile.mkdtemp(prefix="secondbrain-base-", dir="/var/tmp"))
    try:
        logged(
            "debootstrap",
            ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), "bookworm", root, mirror],
            tail_of=root / "debootstrap" / "debootstrap.log",  # where it says which package failed
        )
        certs = Path("/usr/local/share/ca-certificates")
        for cert in certs.glob("*.crt") if certs.is_dir() else []:
            shutil.copy(cert, root / "usr/local/share/ca-certificates" / cert.name)
        # It warns that the bundle is not one certificate: it never is. Errors still fail.
        run("chroot", root, "update-ca-certificates", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run("chroot", root, "python3.11", "-m", "venv", VENV)
        config = configparser.ConfigParser()
        config["global"] = {**_host_pip_settings(), "cert": "/etc/ssl/certs/ca-certificates.crt"}
        with (root / "etc/pip.conf").open("w") as out:
            out.write("# This machine's pip settings (scripts/image.py): its indexes and TLS proxy.\n")
            config.write(out)
        run("chroot", root, "apt-get", "clean")
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        log(f"base: importing as {BASE_IMAGE}")
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        podman(
            "import",
            "--change",
            f"ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            'CMD ["python"]',
            "-",
            BASE_IMAGE,
            stdin=tar.stdout,
        )
        if tar.wait() != 0:
            raise SystemExit("tar of the base tree failed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


POSTGRES_CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
# Debian's package creates and starts a cluster on install; the container's command makes its own.
RUN mkdir -p /etc/postgresql-common/createcluster.d \\
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/no-main.conf \\
 && apt-get update -q && apt-get install -y -q --no-install-recommends postgresql-15 \\
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
USER postgres
"""


def postgres_build() -> None:
    log(f"postgres: {POSTGRES_IMAGE} (Debian's postgresql-15 on the base)")
    with tempfile.TemporaryDirectory(prefix="secondbrain-pg-image-") as context:
        (Path(context) / "Containerfile").write_text(POSTGRES_CONTAINERFILE)
        logged("postgres-build", [*PODMAN, "build", "--network", "host", "-t", POSTGRES_IMAGE, context])


def app_build() -> None:
    """The project's Dockerfile on the local base; pip's local indexes mounted read-only."""
    mounts = [arg for path in local_index_dirs(_host_pip_settings()) for arg in ("--volume", f"{path}:{path}:ro")]
    log(f"app: {APP_IMAGE} from the Dockerfile, BASE_IMAGE={BASE_IMAGE}")
    arguments = ["--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *mounts, "-t", APP_IMAGE]
    logged("app-build", [*PODMAN, "build", *arguments, "-f", BASE_DIR / "Dockerfile", BASE_DIR])


def build() -> dict[str, float]:
    """Every image; the base and PostgreSQL ones only when missing. Seconds per step."""
    machine_prepare()
    seconds: dict[str, float] = {}
    for name, image, step in (("base", BASE_IMAGE, base_build), ("postgres", POSTGRES_IMAGE, postgres_build)):
        started = time.monotonic()
        if image_exists(image):
            log(f"{name}: {image} exists, kept (podman rmi {image} to rebuild it)")
        else:
            step()
        seconds[name] = time.monotonic() - started
    started = time.monotonic()
    app_build()
    seconds["app"] = time.monotonic() - started
    log("built in " + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()))
    return seconds


# --- docker-compose.yml as containers ---------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}."""

    def replace(found: re.Match) -> str:
        name, operator, argument = found.group(1), found.group(2), found.group(3) or ""
        current = env.get(name)
        unset = current is None or (operator in (":-", ":?") and current == "")
        if not unset:
            return current
        if operator in (":-", "-"):
            return argument
        if operator in (":?", "?"):
            raise SystemExit(f"{name}: {argument or 'required'}")
        return ""

    return _VARIABLE.sub(replace, value)


def seconds(duration: str | int | float) -> float:
    """A compose duration (45s, 1m30s, 500ms) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit] for n, unit in parts)


@dataclass
class Healthcheck:
    test: list[str]  # what `podman exec` runs
    interval: float
    timeout: float
    retries: int
    start_period: float


@dataclass
class ContainerSpec:
    name: str
    service: str
    image: str
    command: list[str] | None
    environment: dict[str, str] = field(default_factory=dict)
    healthcheck: Healthcheck | None = None
    stop_grace_seconds: float = 10.0  # compose's default
    one_shot: bool = False  # restart: "no" and others depend on it completing

    def run_args(self, label: str) -> list[str]:
        """`podman run` arguments. Values are passed by name from podman's own environment
        (`--env NAME`), so secrets stay off the command line."""
        args = ["run", "--detach", "--name", self.name, "--hostname", self.name, "--network", "host"]
        args += ["--label", f"{LABEL}={label}", "--stop-timeout", str(round(self.stop_grace_seconds))]
        for name in self.environment:
            args += ["--env", name]
        return [*args, self.image, *(self.command or [])]


def _healthcheck(data: dict | None) -> Healthcheck | None:
    if not data or data.get("disable"):
        return None
    test = data["test"]
    if isinstance(test, str):
        test = ["sh", "-c", test]
    elif test[0] == "CMD-SHELL":
        test = ["sh", "-c", test[1]]
    elif test[0] == "CMD":
        test = test[1:]
    return Healthcheck(
        test=[str(t) for t in test],
        interval=seconds(data.get("interval", "30s")),
        timeout=seconds(data.get("timeout", "30s")),
        retries=int(data.get("retries", 3)),
        start_period=seconds(data.get("start_period", "0s")),
    )


def _in_start_order(services: dict[str, dict]) -> list[str]:
    ordered: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise SystemExit(f"docker-compose.yml: depends_on cycle through {name}")
        if name not in ordered:
            for dependency in services[name].get("depends_on") or {}:
                visit(dependency, (*path, name))
            ordered.append(name)

    for name in services:
        visit(name, ())
    return ordered


def container_specs(
    compose: dict, env: dict[str, str], *, ports: dict[str, int], prefix: str = "secondbrain-smoke"
) -> list[ContainerSpec]:
    """The containers `docker compose up` would start, in start order, on the host network.

    `ports` gives each service that listens its port on 127.0.0.1 (the postgres and web services
    here); `service:containerport` in any value becomes 127.0.0.1:port, as the compose network's
    name resolution would. Compose's images become the local ones; the web's command is the
    image's own, bound to 127.0.0.1 on its port, and its health check asks that port."""
    services = compose["services"]
    renames: dict[str, str] = {}
    for name, port in ports.items():
        published = [str(mapping).split(":")[-1] for mapping in services[name].get("ports") or []]
        for container_port in published or [IMPLICIT_PORTS[name]]:
            renames[f"{name}:{container_port}"] = f"127.0.0.1:{port}"

    def resolve(value: object) -> str:
        text = interpolate(str(value), env)
        for old, new in renames.items():
            text = re.sub(rf"(?<=[@/]){re.escape(old)}\b", new, text)
        return text

    specs: list[ContainerSpec] = []
    for name in _in_start_order(services):
        service = services[name]
        environment = {key: resolve(value) for key, value in (service.get("environment") or {}).items()}
        command = [resolve(part) for part in service["command"]] if service.get("command") else None
        healthcheck = _healthcheck(service.get("healthcheck"))
        if name == "postgres":
            image = POSTGRES_IMAGE
            environment |= {"PGHOST": "127.0.0.1", "PGPORT": str(ports[name])}
            command = ["sh", "-c", POSTGRES_COMMAND]
        else:
            image = APP_IMAGE
        if service.get("ports"):
            command = web_command(ports[name])
            if healthcheck is not None:
                healthcheck.test.append(str(ports[name]))
        replicas = int(resolve((service.get("deploy") or {}).get("replicas", 1)))
        for index in range(1, replicas + 1):
            specs.append(
                ContainerSpec(
                    name=f"{prefix}-{name}" + (f"-{index}" if replicas > 1 else ""),
                    service=name,
                    image=image,
                    command=command,
                    environment=dict(environment),
                    healthcheck=healthcheck,
                    stop_grace_seconds=seconds(service.get("stop_grace_period", "10s")),
                    one_shot=str(service.get("restart", "no")) == "no",
                )
            )
    return specs


def web_command(port: int) -> list[str]:
    """The Dockerfile's server command bound to 127.0.0.1:port instead of 0.0.0.0:8000 (the host
    network has no port mapping), as the bench and `make chaos` start it."""
    from bench.harness import server_args

    return ["python", *server_args(port)]


# The official postgres image's entrypoint, in short: a cluster with the password, the database,
# then the server in the foreground on the given port (PGPORT), 127.0.0.1 only.
POSTGRES_COMMAND = """set -e
printf '%s' "$POSTGRES_PASSWORD" > /tmp/pwfile
initdb -D /tmp/pgdata -U "$POSTGRES_USER" --auth-local=trust --auth-host=scram-sha-256 \
  --pwfile=/tmp/pwfile --encoding=UTF8 --no-sync > /dev/null
rm /tmp/pwfile
pg_ctl -D /tmp/pgdata -o "-c listen_addresses= -c unix_socket_directories=/tmp" -w start > /dev/null
createdb -h /tmp -U "$POSTGRES_USER" "$POSTGRES_DB"
pg_ctl -D /tmp/pgdata -m fast -w stop > /dev/null
exec postgres -D /tmp/pgdata -c listen_addresses=127.0.0.1 -c port="$PGPORT" -c unix_socket_directories=/tmp
"""


# --- main -------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "smoke"])
    parser.add_argument("--timeout", type=float, default=600.0, help="the smoke run's limit after the build (s)")
    parser.add_argument(
        "--slack", type=float, default=3.0, help="health checks get the compose timeouts times this (loaded machines)"
    )
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    started = time.monotonic()
    try:
        build_seconds = build()
        if options.command == "build":
            return 0
        from scripts.image_smoke import smoke

        ok = smoke(timeout=options.timeout, slack=options.slack)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    log(
        f"smoke test {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s "
        f"(build {sum(build_seconds.values()):.0f} s)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
