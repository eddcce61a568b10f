"""DATABASE_URL with several hosts (a primary and its standby), libpq style."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured

from config.database_url import database_url_config, describe_hosts
from tests.helpers import BASE_DIR


def test_two_hosts_become_libpq_comma_lists_with_target_session_attrs():
    config = database_url_config(
        "DATABASE_URL", "postgres://app:pw@db1:5432,db2:5433/secondbrain?target_session_attrs=read-write"
    )
    assert (config["HOST"], config["PORT"]) == ("db1,db2", "5432,5433")
    assert (config["NAME"], config["USER"], config["PASSWORD"]) == ("secondbrain", "app", "pw")
    assert config["OPTIONS"] == {"target_session_attrs": "read-write"}


def test_each_host_keeps_its_own_port_and_a_host_without_one_gets_the_default():
    """django-environ gives every host the one port it finds last ("db1:5433,db2" -> 5433 for both)."""
    assert database_url_config("DATABASE_URL", "postgres://u@db1:5433,db2/d")["PORT"] == "5433,"
    assert database_url_config("DATABASE_URL", "postgres://u@db1,db2:5433/d")["PORT"] == ",5433"
    config = database_url_config("DATABASE_URL", "postgres://u@[::1]:5432,[fd00::2]:5433/d")
    assert (config["HOST"], config["PORT"]) == ("::1,fd00::2", "5432,5433")


def test_one_host_is_parsed_as_before():
    config = database_url_config("DATABASE_URL", "postgres://u@127.0.0.1:5432/d?sslmode=require")
    assert (config["HOST"], config["PORT"], config["OPTIONS"]) == ("127.0.0.1", 5432, {"sslmode": "require"})


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgres://u@db1:5432,,db2:5432/d", "''"),
        ("postgres://u@db1:abc,db2:5432/d", "'abc' is not a port"),
        ("postgres://u@db1:70000,db2/d", "'70000' is not a port"),
        ("postgres://u@db1:1:2,db2/d", "'db1:1:2'"),
        ("postgres://u@db1,db2/d?target_session_attrs=readwrite", "target_session_attrs must be one of"),
        ("postgres://u@db1:port/d", "not a database URL"),
    ],
)
def test_a_bad_list_of_hosts_fails_naming_the_variable(url, complaint):
    with pytest.raises(ImproperlyConfigured, match=r"^DATABASE_DIRECT_URL") as raised:
        database_url_config("DATABASE_DIRECT_URL", url)
    assert complaint in str(raised.value)


def test_psycopg_gets_the_lists_and_tries_every_host_in_order():
    """What Django passes on: psycopg splits the lists into one attempt per host."""
    config = database_url_config(
        "DATABASE_URL", "postgres://u@127.0.0.1:1,127.0.0.1:2/d?target_session_attrs=read-write"
    )
    attempts = psycopg.conninfo.conninfo_attempts({"host": config["HOST"], "port": config["PORT"], **config["OPTIONS"]})
    assert [(a["host"], a["port"], a["target_session_attrs"]) for a in attempts] == [
        ("127.0.0.1", "1", "read-write"),
        ("127.0.0.1", "2", "read-write"),
    ]
    assert describe_hosts(config["HOST"], config["PORT"]) == "127.0.0.1:1, 127.0.0.1:2"


def test_settings_give_django_and_the_direct_connection_the_lists_and_a_bad_url_stops_the_start():
    script = (
        "import django, json; django.setup(); from django.conf import settings;"
        " d, direct = settings.DATABASES['default'], settings.DATABASE_DIRECT;"
        " print(json.dumps([d['HOST'], d['PORT'], d['OPTIONS'], direct['HOST'], direct['PORT'], direct['OPTIONS']]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATABASE_URL": "postgres://u@10.0.0.1:6432,10.0.0.2:6432/d?target_session_attrs=read-write",
            "DATABASE_DIRECT_URL": "postgres://u@10.0.0.1:5432,10.0.0.2/d?target_session_attrs=read-write",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    host, port, options, direct_host, direct_port, direct_options = json.loads(result.stdout)
    assert (host, port, options["target_session_attrs"]) == ("10.0.0.1,10.0.0.2", "6432,6432", "read-write")
    assert (direct_host, direct_port, direct_options["target_session_attrs"]) == (
        "10.0.0.1,10.0.0.2",
        "5432,",
        "read-write",
    )
    started = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": "postgres://u@10.0.0.1:5432,:x/d"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2
    assert started.stderr.strip().count("\n") == 0, started.stderr
    assert "DATABASE_URL" in started.stderr


def test_the_start_up_check_names_every_host_it_tried(tmp_path):
    started = subprocess.run(
        [sys.executable, "manage.py", "migrate"],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": "postgres://u@127.0.0.1:1,127.0.0.1:2/d?target_session_attrs=read-write"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2
    assert "cannot reach the database at 127.0.0.1:1, 127.0.0.1:2/d" in started.stderr
