from __future__ import annotations

import pytest

from tests.integration.conftest import free_port


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """Where Ray's metrics endpoint serves the routers' router_tracked_requests."""
    return free_port()
