# One image for every role; the command picks it:
#   default                                  gunicorn (ASGI) on 0.0.0.0:8000 (the API and the admin)
#   python manage.py procrastinate worker    a job worker (add -q QUEUE to take a subset)
#   python manage.py migrate --no-input      the schema, run once before the others
#
# The base is a build argument so that a locally built one can stand in (a machine without a
# registry); production keeps the public image.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY requirements/base.txt requirements/base.txt
RUN pip install -r requirements/base.txt

COPY . .

# Static files at build time, with gzip copies; gunicorn serves them itself (WhiteNoise).
# Settings refuse to load without a database URL, a real secret and a mail server when DEBUG
# is off; collectstatic neither connects nor sends, so throw-away values do.
RUN DATABASE_URL=postgres://build@localhost/build \
    SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(50))')" \
    EMAIL_URL=dummymail:// \
    python manage.py collectstatic --no-input --verbosity 0

# gunicorn keeps its control socket under $HOME, hence a home directory.
RUN useradd --create-home --uid 10001 --user-group app
USER app

EXPOSE 8000

# Worker processes and timeouts; override the whole string at run time. Each worker is one
# asyncio process (uvicorn): sync views run in threads, job streams (SSE) on the event loop.
ENV GUNICORN_CMD_ARGS="--workers 2 --timeout 30 --graceful-timeout 30 --access-logfile -"

# ASGI under gunicorn's process manager (uvicorn-worker). --preload loads the app once in the
# master: a missing SECRET_KEY or an unreachable database then ends the container with one
# line instead of workers crash-looping.
CMD ["gunicorn", "config.asgi:application", "--worker-class", "uvicorn_worker.UvicornWorker", "--bind", "0.0.0.0:8000", "--preload"]
