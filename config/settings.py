"""Settings for secondbrain, read from the environment (see the table in docs/operating.md).

Every value has a safe default except the ones that must not have one in production:
with DEBUG off, SECRET_KEY must be set to a real secret and EMAIL_URL to a real mail server.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path

import environ
from croniter import croniter
from django.core.exceptions import ImproperlyConfigured

from config.database_url import database_url_config

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DEBUG", default=False)

_DEV_SECRET_KEY = "django-insecure-development-only-key-never-use-in-production"
SECRET_KEY = env.str("SECRET_KEY", default=_DEV_SECRET_KEY if DEBUG else "")
if not DEBUG and (len(SECRET_KEY) < 32 or SECRET_KEY.startswith("django-insecure")):
    raise ImproperlyConfigured("SECRET_KEY must be set to a random string of at least 32 characters when DEBUG is off")

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"] if DEBUG else [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # Before staticfiles: `runserver` leaves /static/ to WhiteNoise too, as gunicorn does.
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here: /api/docs/ works offline
    "procrastinate.contrib.django",
    "core",
    "jobs",
    "llm",
    "notes",
    "notifications",
    "digests",
    "observability",  # the top floor: reads every app above
]

MIDDLEWARE = [
    # The request's span when tracing is on (TRACING_ENABLED), a None check when it is off.
    "core.tracing.TracingMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ from any web process (gunicorn included), before anything touches the
    # database: the admin's CSS and the dashboard's script need no reverse proxy.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # A database that cannot be reached answers 503 with Retry-After, never a 500 or a hang.
    "core.middleware.DatabaseUnavailableMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL only: the job queue, its schedules and its locks live in this database. The URL may
# list a primary and its standbys, "postgres://u@db1:5432,db2:5432/db?target_session_attrs=read-write"
# (config/database_url.py, docs/reliability.md#failover): every connection then finds the primary.
if not env.str("DATABASE_URL", default=""):
    raise ImproperlyConfigured("DATABASE_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/secondbrain)")
DATABASES = {"default": database_url_config("DATABASE_URL", env.str("DATABASE_URL"))}
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured("DATABASE_URL must point to PostgreSQL (postgres://...)")
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# The web server (ASGI, config/asgi.py) runs each request in a thread of its own, so a connection
# kept per thread would be a new connection per request: there each process shares a pool of
# this many connections instead (DATABASE_CONN_MAX_AGE then does not apply). "0" turns it off.
DATABASE_POOL_MAX_SIZE = env.int("DATABASE_POOL_MAX_SIZE", default=8)
# Threads per web process that run requests' sync code (middleware and views), each one request
# at a time; more requests at once wait on the event loop for one (config/handler.py). Python
# runs one thread at a time per process, so more threads do not serve more requests; they only
# switch more. Job streams (SSE) do not take one.
WEB_REQUEST_THREADS = env.int("WEB_REQUEST_THREADS", default=4)
if WEB_REQUEST_THREADS < 1:
    raise ImproperlyConfigured("WEB_REQUEST_THREADS must be at least 1")
# How long a request waits for a pooled connection (all busy, or the database away) before 503.
DATABASE_POOL_TIMEOUT_SECONDS = env.float("DATABASE_POOL_TIMEOUT_SECONDS", default=2.0)
if DATABASE_POOL_TIMEOUT_SECONDS <= 0:
    raise ImproperlyConfigured("DATABASE_POOL_TIMEOUT_SECONDS must be more than 0")
DATABASES["default"].setdefault("OPTIONS", {})
DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=5))
# A request that finds the database unreachable gets a 503 saying to retry after this long.
DATABASE_RETRY_AFTER_SECONDS = env.int("DATABASE_RETRY_AFTER_SECONDS", default=5)
# Sessions of a host that died (power, network) or a process that hangs must not hold their
# row locks for the kernel's two hours of TCP keepalive. Keepalives both ways: libpq's notice a
# dead server, the server's (tcp_keepalives_*) a dead client host, after idle + interval x count
# seconds. A session idle inside a transaction for DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS
# is ended by the server (0: never), which frees its locks even when its host still answers.
DATABASE_KEEPALIVES_IDLE_SECONDS = env.int("DATABASE_KEEPALIVES_IDLE_SECONDS", default=10)
DATABASE_KEEPALIVES_INTERVAL_SECONDS = env.int("DATABASE_KEEPALIVES_INTERVAL_SECONDS", default=5)
DATABASE_KEEPALIVES_COUNT = env.int("DATABASE_KEEPALIVES_COUNT", default=3)
DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS = env.float("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", default=20.0)
for _name, _value in (
    ("DATABASE_KEEPALIVES_IDLE_SECONDS", DATABASE_KEEPALIVES_IDLE_SECONDS),
    ("DATABASE_KEEPALIVES_INTERVAL_SECONDS", DATABASE_KEEPALIVES_INTERVAL_SECONDS),
    ("DATABASE_KEEPALIVES_COUNT", DATABASE_KEEPALIVES_COUNT),
):
    if _value < 1:
        raise ImproperlyConfigured(f"{_name} must be at least 1 (got {_value})")
if DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS < 0:
    raise ImproperlyConfigured("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS must be 0 (off) or more")
DATABASES["default"]["OPTIONS"].update(
    keepalives=1,
    keepalives_idle=DATABASE_KEEPALIVES_IDLE_SECONDS,
    keepalives_interval=DATABASE_KEEPALIVES_INTERVAL_SECONDS,
    keepalives_count=DATABASE_KEEPALIVES_COUNT,
)
# Server settings of every session (web processes, a worker's pool and its jobs' connections),
# as startup options after any the URL gives; behind a pooler, of the direct sessions only
# (below). client_connection_check_interval: a killed process's backend notices the closed
# socket even while it waits on a lock, and aborts instead of committing a statement nobody is
# waiting for any more.
_SESSION_SETTINGS = {
    "client_connection_check_interval": 500,
    "idle_in_transaction_session_timeout": int(DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS * 1000),
    "tcp_keepalives_idle": DATABASE_KEEPALIVES_IDLE_SECONDS,
    "tcp_keepalives_interval": DATABASE_KEEPALIVES_INTERVAL_SECONDS,
    "tcp_keepalives_count": DATABASE_KEEPALIVES_COUNT,
}
_URL_OPTIONS = DATABASES["default"]["OPTIONS"].get("options", "")
_SESSION_OPTIONS = " ".join([_URL_OPTIONS, *(f"-c {k}={v}" for k, v in _SESSION_SETTINGS.items())]).strip()
DATABASES["default"]["OPTIONS"]["options"] = _SESSION_OPTIONS
# Parameters bound by the server, and a statement run a fifth time on a connection prepared
# (psycopg's prepare_threshold): PostgreSQL then parses and plans each repeated query once per
# connection instead of on every call. Planning was a third of a defer's time and more than
# half of an e-mail's UPDATEs (docs/performance.md). Django leaves both off by default, for
# poolers in transaction mode: behind one (below) only the direct sessions prepare.
DATABASE_PREPARE_THRESHOLD = 5
DATABASES["default"]["OPTIONS"].update(server_side_binding=True, prepare_threshold=DATABASE_PREPARE_THRESHOLD)
# TLS to the database (libpq's sslmode and sslrootcert; also accepted as ?sslmode= in the URL).
# The web processes, the workers' pool and the start-up check all connect with these.
DATABASE_SSLMODE = env.str("DATABASE_SSLMODE", default="")
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
if DATABASE_SSLMODE:
    if DATABASE_SSLMODE not in _SSLMODES:
        raise ImproperlyConfigured(f"DATABASE_SSLMODE must be one of {', '.join(_SSLMODES)} (got {DATABASE_SSLMODE!r})")
    DATABASES["default"]["OPTIONS"]["sslmode"] = DATABASE_SSLMODE
DATABASE_SSLROOTCERT = env.str("DATABASE_SSLROOTCERT", default="")
if DATABASE_SSLROOTCERT:
    # "system" (libpq 16+) means the operating system's trusted CAs.
    if DATABASE_SSLROOTCERT != "system" and not Path(DATABASE_SSLROOTCERT).is_file():
        raise ImproperlyConfigured(f"DATABASE_SSLROOTCERT: no such file {DATABASE_SSLROOTCERT!r}")
    DATABASES["default"]["OPTIONS"]["sslrootcert"] = DATABASE_SSLROOTCERT
# Behind a connection pooler in transaction mode (docs/operating.md#running-behind-a-connection-pooler)
# DATABASE_URL points at the pooler and DATABASE_DIRECT_URL at PostgreSQL itself (or a
# session-mode pool): workers (their pool, LISTEN connection and Django connection) and the web's
# job streams (LISTEN, session advisory locks) connect there. Unset, or the same URL: no pooler.
# Through the pooler the web sends no startup options (PgBouncer refuses unknown ones) and keeps
# no session state: no prepared statements either (below).
_DIRECT_URL = env.str("DATABASE_DIRECT_URL", default="")
DATABASE_BEHIND_POOLER = bool(_DIRECT_URL) and env.str("DATABASE_URL") != _DIRECT_URL
# The direct connection's Django settings (NAME, USER, PASSWORD, HOST, PORT, OPTIONS), applied over
# DATABASES["default"] by config.database; None without a pooler.
DATABASE_DIRECT: dict | None = None
if DATABASE_BEHIND_POOLER:
    _direct = database_url_config("DATABASE_DIRECT_URL", _DIRECT_URL)
    if _direct.get("ENGINE") != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_DIRECT_URL must point to PostgreSQL (postgres://...)")
    _direct_options = _direct.get("OPTIONS", {})
    DATABASE_DIRECT = {
        **{key: _direct.get(key) or "" for key in ("NAME", "USER", "PASSWORD", "HOST", "PORT")},
        "OPTIONS": {
            **DATABASES["default"]["OPTIONS"],
            **_direct_options,
            "options": " ".join(
                [_direct_options.get("options", ""), *(f"-c {k}={v}" for k, v in _SESSION_SETTINGS.items())]
            ).strip(),
        },
    }
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = None
    if _URL_OPTIONS:
        DATABASES["default"]["OPTIONS"]["options"] = _URL_OPTIONS
    else:
        DATABASES["default"]["OPTIONS"].pop("options")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where `collectstatic` puts the files that WhiteNoise serves (the Docker image collects at build).
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / ".data" / "static")))
# `collectstatic` writes gzip and brotli copies next to each file, which WhiteNoise serves
# with far-future caching. No manifest: nothing fails when files were never collected (tests).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Without collected files (development, tests) WhiteNoise finds them in the apps instead.
WHITENOISE_USE_FINDERS = not (STATIC_ROOT / "admin").is_dir()

# --- HTTPS and cookies (production behind TLS; see `manage.py check --deploy`) ---------------
# Every default keeps plain HTTP working (`make run`, the tests); production sets them.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
# The header a TLS-terminating proxy sets, as "HEADER,value", e.g. "X-Forwarded-Proto,https".
# Only set it when such a proxy strips the header from clients' requests.
_proxy_ssl_header = env.list("SECURE_PROXY_SSL_HEADER", default=[])
if _proxy_ssl_header:
    if len(_proxy_ssl_header) != 2:
        raise ImproperlyConfigured('SECURE_PROXY_SSL_HEADER must be "HEADER,value", e.g. "X-Forwarded-Proto,https"')
    _header = _proxy_ssl_header[0].strip().upper().replace("-", "_")
    SECURE_PROXY_SSL_HEADER = (
        _header if _header.startswith("HTTP_") else f"HTTP_{_header}",
        _proxy_ssl_header[1].strip(),
    )
# Origins allowed to POST with a session (admin, dashboard) from another scheme/host, e.g.
# https://secondbrain.example.com behind a proxy.
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# Request bodies above this are refused before any parsing (413/400, never a 500).
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=1_048_576)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "core.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.SearchFilter",
        "rest_framework.filters.OrderingFilter",
    ],
    # JSON that is too deep or not Unicode is a 400, not a 500 (core/parsers.py).
    "DEFAULT_PARSER_CLASSES": [
        "core.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # drf-spectacular's, plus the error responses every operation can give (core/schema.py).
    "DEFAULT_SCHEMA_CLASS": "core.schema.AutoSchema",
    "EXCEPTION_HANDLER": "core.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # Per user (token or session) and per anonymous client address; rates below (core/throttling.py).
    "DEFAULT_THROTTLE_CLASSES": ["core.throttling.UserRateThrottle", "core.throttling.AnonRateThrottle"],
    # X-Forwarded-For is trusted only through this many proxies; 0 uses the peer's address.
    "NUM_PROXIES": env.int("THROTTLE_NUM_PROXIES", default=0),
}

# --- Throttling and duplicate requests (core/) -----------------------------------------------
_RATE = r"^\d+/(s|sec|second|m|min|minute|h|hour|d|day)$"


def _rate(name: str, default: str) -> str | None:
    """A DRF rate such as "600/min"; "off" (or empty) disables that throttle."""
    value = env.str(name, default=default).strip()
    if value.lower() in ("", "off", "none"):
        return None
    if not re.match(_RATE, value):
        raise ImproperlyConfigured(f'{name} must look like "600/min" (per s, min, hour or day) or "off"; got {value!r}')
    return value


def _cron(name: str, default: str) -> str:
    """A cron expression (5 fields, or 6 with seconds last), checked here so a typo names its variable."""
    value = env.str(name, default=default).strip()
    if not croniter.is_valid(value):
        raise ImproperlyConfigured(f'{name} must be a cron expression such as "0 2 * * 5"; got {value!r}')
    return value


def _time_zone(name: str, default: str) -> str:
    """An IANA time zone name ("Europe/Paris"), checked against the system's zone database."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    value = env.str(name, default=default).strip()
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ImproperlyConfigured(f'{name} must be an IANA time zone such as "Europe/Paris"; got {value!r}') from None
    return value


THROTTLE_USER_RATE = _rate("THROTTLE_USER_RATE", "600/min")
THROTTLE_ANON_RATE = _rate("THROTTLE_ANON_RATE", "60/min")
# Throttle counters live in PostgreSQL (the table comes from core's migration), so every web
# process shares them. Expired rows are deleted by the periodic purge (core.purge_expired).
CACHES = {
    "default": {
        # Django's DatabaseCache with a one-statement write (core/cache.py).
        "BACKEND": "core.cache.PostgresDatabaseCache",
        "LOCATION": "core_cache",
        # set() never culls (core/cache.py); add() and touch() still would past MAX_ENTRIES,
        # dropping a third of the entries, live counters included: far out of reach.
        "OPTIONS": {"MAX_ENTRIES": 10_000_000},
    }
}
# How long an Idempotency-Key and its stored response are kept.
IDEMPOTENCY_KEY_TTL_SECONDS = env.int("IDEMPOTENCY_KEY_TTL_SECONDS", default=24 * 3600)

SPECTACULAR_SETTINGS = {
    "TITLE": "secondbrain API",
    "DESCRIPTION": "Notes, notifications and digests over a PostgreSQL job system.",
    "VERSION": "0.1.0",
    # Several models have a `status` with other choices: name this set instead of hashing it.
    "ENUM_NAME_OVERRIDES": {
        "NoteImportStatusEnum": "notes.models.ImportStatus",
        "NotificationStatusEnum": "notifications.models.Status",
        "NoteTypeEnum": "notes.models.NoteType",
    },
    # Request bodies get their own components (no read-only fields; files as binary), so a
    # client or fuzzer generating from the schema sends what the API reads.
    "COMPONENT_SPLIT_REQUEST": True,
    # Descriptions from the serializers' own docstrings, never from our bases' (core/schema.py).
    "GET_LIB_DOC_EXCLUDES": "core.schema.lib_doc_excludes",
    # /api/docs/ serves Swagger UI from drf-spectacular-sidecar's static files, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Claude (Tier-2 enrichment and AI digests) ----------------------------------------------
ANTHROPIC_API_KEY = env.str("ANTHROPIC_API_KEY", default="")
ANTHROPIC_BASE_URL = env.str("ANTHROPIC_BASE_URL", default="https://api.anthropic.com")
ANTHROPIC_MODEL = env.str("ANTHROPIC_MODEL", default="claude-haiku-4-5")
ANTHROPIC_TIMEOUT_SECONDS = env.float("ANTHROPIC_TIMEOUT_SECONDS", default=30.0)
LLM_MONTHLY_BUDGET_USD = env.float("LLM_MONTHLY_BUDGET_USD", default=5.0)
# Per user and UTC day, on top of the monthly budget for everyone (0: no daily cap per user).
LLM_DAILY_BUDGET_USD_PER_USER = env.float("LLM_DAILY_BUDGET_USD_PER_USER", default=1.0)
# Claude calls of one user running at once (notes.enrich and digests.weekly_digest share the
# key llm:user:<id>): one user's import of thousands of notes never holds every worker slot.
LLM_CONCURRENCY_PER_USER = env.int("LLM_CONCURRENCY_PER_USER", default=2)
if LLM_CONCURRENCY_PER_USER < 1:
    raise ImproperlyConfigured("LLM_CONCURRENCY_PER_USER must be at least 1")

# --- Notes -----------------------------------------------------------------------------------
NOTE_MAX_CONTENT_BYTES = env.int("NOTE_MAX_CONTENT_BYTES", default=100_000)

# --- E-mail and notifications ----------------------------------------------------------------
# smtp://user:pass@host:587 (smtp+tls://, smtp+ssl://), consolemail://, filemail://, ...
# `make run` uses filemail://: one file per message under EMAIL_FILE_PATH (.data/mail).
# Required with DEBUG off: the console default would print every recipient, subject and body
# (digests quote notes) to the logs of a production worker, and send nothing.
if not DEBUG and not env.str("EMAIL_URL", default=""):
    raise ImproperlyConfigured("EMAIL_URL must be set when DEBUG is off (e.g. smtp+tls://user:password@host:587)")
_email = env.email_url("EMAIL_URL", default="consolemail://")
EMAIL_BACKEND = _email["EMAIL_BACKEND"]
if EMAIL_BACKEND == "django.core.mail.backends.smtp.EmailBackend":
    # Same SMTP settings; commits "sent" just before the final dot (see notifications/mail.py).
    EMAIL_BACKEND = "notifications.mail.ExactlyOnceSMTPBackend"
EMAIL_HOST = _email.get("EMAIL_HOST") or "localhost"
EMAIL_PORT = _email.get("EMAIL_PORT") or 25
EMAIL_HOST_USER = _email.get("EMAIL_HOST_USER") or ""
EMAIL_HOST_PASSWORD = _email.get("EMAIL_HOST_PASSWORD") or ""
EMAIL_USE_TLS = bool(_email.get("EMAIL_USE_TLS"))
EMAIL_USE_SSL = bool(_email.get("EMAIL_USE_SSL"))
EMAIL_FILE_PATH = BASE_DIR / env.str("EMAIL_FILE_PATH", default=".data/mail")  # for filemail://
EMAIL_TIMEOUT = env.float("EMAIL_TIMEOUT", default=10.0)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="secondbrain <noreply@secondbrain.localhost>")

NOTIFICATIONS_RATE_PER_SECOND = env.float("NOTIFICATIONS_RATE_PER_SECOND", default=50.0)
NOTIFICATIONS_BREAKER_THRESHOLD = env.int("NOTIFICATIONS_BREAKER_THRESHOLD", default=5)
NOTIFICATIONS_BREAKER_COOLDOWN_SECONDS = env.float("NOTIFICATIONS_BREAKER_COOLDOWN_SECONDS", default=30.0)
# A bulk send's e-mails of one owner go in jobs of up to this many (notifications.deliver_many):
# a job costs the queue a claim and an end whatever it sends. 1: one job per e-mail.
NOTIFICATIONS_BATCH_SIZE = env.int("NOTIFICATIONS_BATCH_SIZE", default=20)
NOTIFICATIONS_MAX_BULK_RECIPIENTS = env.int("NOTIFICATIONS_MAX_BULK_RECIPIENTS", default=5000)
NOTIFICATIONS_MAX_BODY_BYTES = env.int("NOTIFICATIONS_MAX_BODY_BYTES", default=100_000)
# Health warns above this failure rate (over the last 15 minutes) or backlog of due jobs.
NOTIFICATIONS_WARN_FAILURE_RATE = env.float("NOTIFICATIONS_WARN_FAILURE_RATE", default=0.2)
NOTIFICATIONS_WARN_BACKLOG = env.int("NOTIFICATIONS_WARN_BACKLOG", default=1000)
# E-mails a user may queue per UTC day, over every send path (0: no quota).
EMAIL_DAILY_QUOTA_PER_USER = env.int("EMAIL_DAILY_QUOTA_PER_USER", default=10_000)
# Finished notification jobs (sent, failed, cancelled) and delivery logs are deleted after these.
NOTIFICATIONS_RETENTION_DAYS = env.int("NOTIFICATIONS_RETENTION_DAYS", default=90)
NOTIFICATIONS_DELIVERY_LOG_RETENTION_DAYS = env.int("NOTIFICATIONS_DELIVERY_LOG_RETENTION_DAYS", default=30)
# A send whose final dot left while the database went away before answering its COMMIT: how
# long its job waits for the database to record it.
NOTIFICATIONS_OUTCOME_WAIT_SECONDS = env.float("NOTIFICATIONS_OUTCOME_WAIT_SECONDS", default=60.0)

# --- Digests --------------------------------------------------------------------------------
DIGEST_SWEEP_CRON = _cron("DIGEST_SWEEP_CRON", "* * * * *")
# The weekly AI digest: Fridays at 02:00 on DIGEST_WEEKLY_TIMEZONE's wall clock (UTC by default).
DIGEST_WEEKLY_CRON = _cron("DIGEST_WEEKLY_CRON", "0 2 * * 5")
DIGEST_WEEKLY_TIMEZONE = _time_zone("DIGEST_WEEKLY_TIMEZONE", "UTC")
DIGEST_TIME_LIMIT_SECONDS = env.float("DIGEST_TIME_LIMIT_SECONDS", default=1800.0)

# --- Job system (Procrastinate) --------------------------------------------------------------
WORKER_CONCURRENCY = env.int("WORKER_CONCURRENCY", default=10)
# A worker whose heartbeat is older than this is considered dead; its jobs get rescued.
WORKER_STALLED_SECONDS = env.float("WORKER_STALLED_SECONDS", default=30.0)
WORKER_HEARTBEAT_SECONDS = env.float("WORKER_HEARTBEAT_SECONDS", default=5.0)
# How often the maintenance queue looks for jobs of dead workers (cron; a 6th field is seconds).
STALLED_JOBS_CRON = _cron("STALLED_JOBS_CRON", "* * * * *")

# On SIGTERM a worker stops fetching, lets running jobs finish for this long, then aborts the
# rest, which are retried.
WORKER_SHUTDOWN_GRACE_SECONDS = env.float("WORKER_SHUTDOWN_GRACE_SECONDS", default=30.0)
# A worker writes its id (its row in procrastinate_workers) to this file once registered, for
# `manage.py jobs_worker_health` in the same container; empty: no file.
WORKER_ID_FILE = env.str("WORKER_ID_FILE", default="")
# The host a worker runs on, recorded on its row (procrastinate_workers.jobs_host) and shown by the
# dashboard: set it where the machine's name says nothing (a container's is a random id).
WORKER_HOSTNAME = env.str("WORKER_HOSTNAME", default="") or socket.gethostname()

PROCRASTINATE_WORKER_DEFAULTS = {
    "concurrency": WORKER_CONCURRENCY,
    "update_heartbeat_interval": WORKER_HEARTBEAT_SECONDS,
    "stalled_worker_timeout": WORKER_STALLED_SECONDS,
    "shutdown_graceful_timeout": WORKER_SHUTDOWN_GRACE_SECONDS,
}
PROCRASTINATE_READONLY_MODELS = True
# Claims take turns between owners (jobs/tasking/fairness.py); false: highest priority, then oldest.
JOBS_FAIR_CLAIMS = env.bool("JOBS_FAIR_CLAIMS", default=True)
# How many defers, anywhere, move the fair clock by a round (jobs/tasking/fairness.py): the
# bound on a backlog's wait for its next turn while new owners alone keep every worker busy.
JOBS_FAIR_DEFERS_PER_ROUND = env.int("JOBS_FAIR_DEFERS_PER_ROUND", default=1_000_000)
# How long a worker's batch of completions waits for more jobs' ends before it is written
# (jobs/engine/manager.py): jobs ending a few milliseconds apart (e-mails, say) then share one
# statement instead of one each. Never for an end that frees a lock or a concurrency slot, nor
# when something waits for the write (a stop); a crash re-runs at most this much more. 0: off.
JOBS_COMPLETION_WINDOW_MS = env.float("JOBS_COMPLETION_WINDOW_MS", default=2.0)
if not 0 <= JOBS_COMPLETION_WINDOW_MS <= 1000:
    raise ImproperlyConfigured("JOBS_COMPLETION_WINDOW_MS must be between 0 and 1000")
# The event loop of `manage.py procrastinate ...` (the worker): uvloop, or Python's own
# ("asyncio", for its debug mode). uvloop takes about a quarter off the worker's CPU per job.
JOBS_EVENT_LOOP = env.str("JOBS_EVENT_LOOP", default="uvloop")
if JOBS_EVENT_LOOP not in ("uvloop", "asyncio"):
    raise ImproperlyConfigured('JOBS_EVENT_LOOP must be "uvloop" or "asyncio"')
# While a worker's jobs take at most this long (a moving average of their run times), it claims
# its next jobs while every slot is still busy (jobs/engine/worker.py): the claim's round trip
# then overlaps the running jobs. A held job waits for the first slot to free; a stop hands the
# held ones back. 0: a job is only claimed for a free slot.
JOBS_CLAIM_AHEAD_MS = env.float("JOBS_CLAIM_AHEAD_MS", default=5.0)
if not 0 <= JOBS_CLAIM_AHEAD_MS <= 1000:
    raise ImproperlyConfigured("JOBS_CLAIM_AHEAD_MS must be between 0 and 1000")
# Extra task modules beyond each app's tasks.py (the benchmark's no-op task: bench.tasks).
PROCRASTINATE_IMPORT_PATHS = env.list("PROCRASTINATE_IMPORT_PATHS", default=[])
# Installs the job layer into the worker: paused queues, rate limits, time limits, results.
PROCRASTINATE_ON_APP_READY = "jobs.engine.app.on_app_ready"

# --- Job operations (jobs/) ------------------------------------------------------------------
# Finished jobs and their events are deleted after these periods; per queue overrides as
# "queue=seconds,queue=seconds". Failed jobs are the dead-letter record.
JOBS_SUCCEEDED_RETENTION_SECONDS = env.int("JOBS_SUCCEEDED_RETENTION_SECONDS", default=3600)
JOBS_FAILED_RETENTION_SECONDS = env.int("JOBS_FAILED_RETENTION_SECONDS", default=7 * 24 * 3600)
JOBS_SUCCEEDED_RETENTION_BY_QUEUE = env.dict("JOBS_SUCCEEDED_RETENTION_BY_QUEUE", cast={"value": int}, default={})
JOBS_FAILED_RETENTION_BY_QUEUE = env.dict("JOBS_FAILED_RETENTION_BY_QUEUE", cast={"value": int}, default={})
JOBS_RETENTION_CRON = _cron("JOBS_RETENTION_CRON", "*/5 * * * *")
JOBS_RETENTION_BATCH_SIZE = env.int("JOBS_RETENTION_BATCH_SIZE", default=1000)
# How long a task's returned result is kept (and shown by the API).
JOBS_RESULT_TTL_SECONDS = env.int("JOBS_RESULT_TTL_SECONDS", default=24 * 3600)
# Rate-limited jobs wait in place when the next token is this close, else they are postponed.
JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS = env.float("JOBS_RATE_LIMIT_INLINE_WAIT_SECONDS", default=1.0)
# Completion webhooks (jobs/tasking/webhooks.py): only these hosts may be called ("a.example.com", or
# ".example.com" for its subdomains), over https on 443 or a listed port, and only at public
# addresses unless private ones are allowed (development, tests) or their network is listed.
JOBS_WEBHOOK_ALLOWED_HOSTS = env.list("JOBS_WEBHOOK_ALLOWED_HOSTS", default=[])
JOBS_WEBHOOK_ALLOW_HTTP = env.bool("JOBS_WEBHOOK_ALLOW_HTTP", default=False)
JOBS_WEBHOOK_ALLOWED_PORTS = env.list("JOBS_WEBHOOK_ALLOWED_PORTS", cast=int, default=[])
JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = env.bool("JOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", default=False)
JOBS_WEBHOOK_ALLOWED_NETWORKS = env.list("JOBS_WEBHOOK_ALLOWED_NETWORKS", default=[])
for _network in JOBS_WEBHOOK_ALLOWED_NETWORKS:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError as _exc:
        raise ImproperlyConfigured(f"JOBS_WEBHOOK_ALLOWED_NETWORKS: {_exc}") from None
# One delivery in all (lookup, connect, TLS, request, answer), and the most of an answer's body read.
JOBS_WEBHOOK_TIMEOUT_SECONDS = env.float("JOBS_WEBHOOK_TIMEOUT_SECONDS", default=5.0)
JOBS_WEBHOOK_MAX_RESPONSE_BYTES = env.int("JOBS_WEBHOOK_MAX_RESPONSE_BYTES", default=65536)
# GET /api/jobs/{id}/stream/ (Server-Sent Events): keep-alive comment interval, and the longest a
# stream stays open (the browser's EventSource then reconnects and gets the current state).
JOBS_STREAM_KEEPALIVE_SECONDS = env.float("JOBS_STREAM_KEEPALIVE_SECONDS", default=15.0)
JOBS_STREAM_MAX_SECONDS = env.float("JOBS_STREAM_MAX_SECONDS", default=3600.0)
# Open streams allowed per user (across every web process) and per web process; beyond, 429 with
# Retry-After. 0 disables that cap.
JOBS_STREAM_MAX_PER_USER = env.int("JOBS_STREAM_MAX_PER_USER", default=10)
JOBS_STREAM_MAX_PER_PROCESS = env.int("JOBS_STREAM_MAX_PER_PROCESS", default=1000)
# GET /metrics (Prometheus): when set, scrapers must send "Authorization: Bearer <token>".
# Without a token /metrics answers 403 unless DEBUG is on or METRICS_PUBLIC says so: the
# numbers (users' volumes, spend, workers) are not for anyone who finds the URL.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_PUBLIC = env.bool("METRICS_PUBLIC", default=False)
# One collection per web process serves every scrape within this many seconds (0: none kept),
# so parallel or frequent scrapes cost the database one set of aggregates.
METRICS_CACHE_SECONDS = env.float("METRICS_CACHE_SECONDS", default=5.0)

# --- Traces (OpenTelemetry, core/tracing.py) -------------------------------------------------
# Off unless an OTLP endpoint is given (OTEL_EXPORTER_OTLP_ENDPOINT, or ..._TRACES_ENDPOINT) or
# TRACING_ENABLED says so; OTEL_SDK_DISABLED=true keeps it off. The exporter (OTLP/HTTP,
# protobuf) reads the standard OTEL_EXPORTER_OTLP_* variables (headers, timeout, ...) itself.
_otlp_endpoint = env.str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", default="") or env.str(
    "OTEL_EXPORTER_OTLP_ENDPOINT", default=""
)
TRACING_ENABLED = env.bool("TRACING_ENABLED", default=bool(_otlp_endpoint)) and not env.bool(
    "OTEL_SDK_DISABLED", default=False
)
TRACING_SERVICE_NAME = env.str("OTEL_SERVICE_NAME", default="secondbrain")

# --- Bulk note import ------------------------------------------------------------------------
IMPORTS_MAX_UPLOAD_BYTES = env.int("IMPORTS_MAX_UPLOAD_BYTES", default=50 * 1024 * 1024)
IMPORTS_BATCH_SIZE = env.int("IMPORTS_BATCH_SIZE", default=1000)
# A finished import's file is deleted this long after it ended (its row and counts stay).
IMPORTS_FILE_RETENTION_HOURS = env.float("IMPORTS_FILE_RETENTION_HOURS", default=24.0)
# Bytes of uploads per user that may wait unfinished (pending or running) at once.
IMPORTS_PENDING_MAX_BYTES = env.int("IMPORTS_PENDING_MAX_BYTES", default=200 * 1024 * 1024)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    # Secrets and e-mail addresses never reach the output, whoever logs them (core/redaction.py).
    "filters": {"redact": {"()": "core.redaction.RedactingFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "procrastinate": {"level": env.str("PROCRASTINATE_LOG_LEVEL", default="WARNING")},
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "mail.log": {"level": "WARNING"},  # aiosmtpd, in the tests
    },
}
