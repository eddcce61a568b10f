"""The named queues. A worker can take all of them or a subset (`-q enrichment`)."""

from __future__ import annotations

ENRICHMENT = "enrichment"
NOTIFICATIONS = "notifications"
DIGESTS = "digests"
IMPORTS = "imports"
MAINTENANCE = "maintenance"
# Completion webhooks: their receivers are other people's servers, so a slow one must not hold
# up the stalled-job rescue and the purge on `maintenance`.
WEBHOOKS = "webhooks"

ALL = (ENRICHMENT, NOTIFICATIONS, DIGESTS, IMPORTS, MAINTENANCE, WEBHOOKS)
