from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from core.erasure import user_erase
from core.fields import StrictCharField
from core.throttling import AnonRateThrottle


class TokenApi(ObtainAuthToken):
    """POST username and password (form or JSON) for the user's API token.

    DRF's view with the project's parsers: its own list would let deeply nested JSON through
    to a RecursionError (a 500) instead of a 400."""

    parser_classes = api_settings.DEFAULT_PARSER_CLASSES
    # DRF's view is not throttled at all; here it has the anonymous rate per client address,
    # which slows down password guessing.
    throttle_classes = [AnonRateThrottle]


class AccountEraseSerializer(serializers.Serializer):
    password = StrictCharField(write_only=True, max_length=4096, trim_whitespace=False)


class AccountEraseApi(APIView):
    """POST the account's password: the user and everything of theirs are deleted (the right to
    erasure, core/erasure.py), their queued jobs included. 204; 400 on a wrong password."""

    @extend_schema(request=AccountEraseSerializer, responses={204: None})
    def post(self, request: Request) -> Response:
        serializer = AccountEraseSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if not request.user.check_password(serializer.validated_data["password"]):
            raise serializers.ValidationError({"password": ["Wrong password; nothing was deleted."]})
        user_erase(user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
