from __future__ import annotations

from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.settings import api_settings

from core.throttling import AnonRateThrottle


class TokenApi(ObtainAuthToken):
    """POST username and password (form or JSON) for the user's API token.

    DRF's view with the project's parsers: its own list would let deeply nested JSON through
    to a RecursionError (a 500) instead of a 400."""

    parser_classes = api_settings.DEFAULT_PARSER_CLASSES
    # DRF's view is not throttled at all; here it has the anonymous rate per client address,
    # which slows down password guessing.
    throttle_classes = [AnonRateThrottle]
