from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.startup import fail_fast_if_database_unreachable

fail_fast_if_database_unreachable()
application = get_wsgi_application()
