"""API token authentication (core/authentication.py): DRF's answers, from one statement built
once per process instead of an ORM query compiled on every request."""

from __future__ import annotations

import pytest
from django.db.models.sql.compiler import SQLCompiler
from django.forms.models import model_to_dict
from rest_framework import exceptions
from rest_framework.authtoken.models import Token
from rest_framework.settings import api_settings
from rest_framework.test import APIClient, APIRequestFactory

from core.authentication import TokenAuthentication, token_with_user
from tests.factories import make_user

pytestmark = pytest.mark.django_db


def _authenticate(key: str):
    request = APIRequestFactory().get("/api/notes/", HTTP_AUTHORIZATION=f"Token {key}")
    return TokenAuthentication().authenticate(request)


def test_the_api_authenticates_tokens_with_it():
    assert TokenAuthentication in api_settings.DEFAULT_AUTHENTICATION_CLASSES
    user = make_user("alice")
    key = Token.objects.create(user=user).key
    assert APIClient().get("/api/notes/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 200
    response = APIClient().get("/api/notes/", HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234567")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid token."}


def test_it_finds_what_drf_finds_in_one_statement_it_does_not_compile_again(monkeypatch, django_assert_num_queries):
    user = make_user("alice", email="alice@example.com", first_name="Alice")
    key = Token.objects.create(user=user).key
    _authenticate(key)  # built here, or by an earlier test
    compiled = []
    upstream = SQLCompiler.as_sql
    monkeypatch.setattr(SQLCompiler, "as_sql", lambda self, *a, **k: compiled.append(self) or upstream(self, *a, **k))
    with django_assert_num_queries(1):
        found_user, token = _authenticate(key)
    assert compiled == []
    expected = Token.objects.select_related("user").get(key=key)
    assert model_to_dict(token) == model_to_dict(expected) and token.created == expected.created
    assert found_user == token.user == user
    assert {**model_to_dict(found_user), "password": None} == {**model_to_dict(expected.user), "password": None}
    assert found_user.password == expected.user.password and found_user.date_joined == expected.user.date_joined


def test_an_unknown_key_and_an_inactive_user_get_drfs_answers():
    user = make_user("alice")
    key = Token.objects.create(user=user).key
    assert token_with_user("no-such-key") is None
    with pytest.raises(exceptions.AuthenticationFailed, match="Invalid token"):
        _authenticate("no-such-key")
    user.is_active = False
    user.save()
    with pytest.raises(exceptions.AuthenticationFailed, match="User inactive or deleted"):
        _authenticate(key)
    user.delete()  # the token goes with it
    with pytest.raises(exceptions.AuthenticationFailed, match="Invalid token"):
        _authenticate(key)
