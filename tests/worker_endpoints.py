"""The metrics endpoints of the test's live workers, as operators find them."""

from __future__ import annotations

from typing import Any

from rewardq.broker.app import create_app
from rewardq.broker.settings import Settings
from rewardq.monitoring.metrics import discover_endpoints


def worker_endpoints(settings: Settings) -> dict[str, Any]:
    """Every live worker's metrics endpoint, found through the fleet's Celery app."""
    app = create_app(settings)
    try:
        return discover_endpoints(app)
    finally:
        app.close()
