"""The OpenAPI schema is valid and complete without warnings, and its docs page works offline."""

from __future__ import annotations

import re

import pytest
import yaml
from django.contrib.staticfiles import finders
from django.core.management import call_command


def test_the_schema_validates_without_a_single_warning(tmp_path):
    # --fail-on-warn: any view drf-spectacular cannot describe (an unknown response, an
    # unnamed enum clash, a path parameter of unknown type) fails here.
    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    schema = yaml.safe_load(target.read_text())
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    assert parameter["schema"].get("type") in ("integer", "string"), (method, path, parameter)
            errors = [code for code in operation["responses"] if code >= "400"]
            assert errors, f"{method} {path} documents no error response"


@pytest.mark.django_db
def test_the_schema_is_served_to_anonymous_clients(client):
    response = client.get("/api/schema/?format=json")
    assert response.status_code == 200
    assert response.json()["info"]["title"] == "secondbrain API"


@pytest.mark.django_db
def test_the_docs_page_loads_its_assets_from_this_server_not_a_cdn(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any("swagger-ui-bundle.js" in asset for asset in assets), assets
    for asset in assets:
        assert asset.startswith("/static/"), f"{asset} is not served by secondbrain"
        assert finders.find(asset.removeprefix("/static/")), f"{asset} is not among the static files"
    assert "cdn" not in page.lower() and "https://" not in page


def test_the_old_names_of_the_notification_ids_are_marked_deprecated(tmp_path):
    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--file", str(target))
    components = yaml.safe_load(target.read_text())["components"]["schemas"]
    assert components["Queued"]["properties"]["job_id"]["deprecated"] is True
    assert components["BulkQueued"]["properties"]["job_ids"]["deprecated"] is True
    assert "deprecated" not in components["Queued"]["properties"]["notification_id"]


def test_components_are_not_described_by_our_serializer_bases(tmp_path):
    from core.serializers import ModelSerializer, SharedFields

    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--file", str(target))
    descriptions = [
        c.get("description", "") for c in yaml.safe_load(target.read_text())["components"]["schemas"].values()
    ]
    for base in (ModelSerializer, SharedFields):
        first_line = base.__doc__.strip().splitlines()[0]
        assert not [d for d in descriptions if first_line in d], f"{base.__name__}'s docstring describes components"
