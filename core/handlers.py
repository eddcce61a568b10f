"""Django's error pages (config/urls.py's handler400/404/500), in JSON under /api/.

DRF answers errors raised inside its views. These cover what happens before a view is found or
outside DRF: a URL that matches no route (`/api/notes/1.5/`), a Host that is not allowed, an
unhandled exception. An API client then still gets JSON in the documented shape, and the
admin and other pages keep Django's HTML pages.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "Bad request."}, status=400)
    return defaults.bad_request(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "Server error."}, status=500)
    return defaults.server_error(request)
