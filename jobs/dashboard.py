"""The staff dashboard inside the admin (/admin/jobs/dashboard/)."""

from __future__ import annotations

urlpatterns: list = []
