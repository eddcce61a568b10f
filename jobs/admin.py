"""Django autodiscovers `<app>.admin`: the admin pages live in the console."""

from jobs.console import admin  # noqa: F401
