"""The top floor: health (/api/health/) and the Prometheus metrics (/metrics).

It reads every app through their selectors, and nothing imports it but the URLconf: the apps
below never know they are watched.
"""
