"""The named queues. A worker can take all of them or a subset (`-q enrichment`)."""

from __future__ import annotations

ENRICHMENT = "enrichment"
NOTIFICATIONS = "notifications"
DIGESTS = "digests"
IMPORTS = "imports"
MAINTENANCE = "maintenance"

ALL = (ENRICHMENT, NOTIFICATIONS, DIGESTS, IMPORTS, MAINTENANCE)
