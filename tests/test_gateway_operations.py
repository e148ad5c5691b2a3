"""Operations settings that sit beside the gateway: where the workers' metrics endpoints
listen (``REWARDQ_METRICS_HOST``)."""

from __future__ import annotations

import socket

import httpx
import pytest

from rewardq.broker.app import create_app
from rewardq.broker.settings import Settings
from rewardq.monitoring.metrics import discover_endpoints

#: Another loopback address: a socket bound to 127.0.0.1 alone does not answer on it,
#: one bound to every interface does (Linux routes all of 127/8 to the loopback device).
OTHER_INTERFACE = "127.0.0.2"


def endpoint_ports(settings: Settings) -> list[int]:
    app = create_app(settings)
    try:
        return [e.port for e in discover_endpoints(app).values()]
    finally:
        app.close()


def answers(host: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/metrics", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_worker_metrics_bind_loopback_unless_metrics_host_says_otherwise(
        settings: Settings, workers) -> None:
    assert Settings().metrics_host == "127.0.0.1"
    if not _routed_to_loopback():
        pytest.skip(f"{OTHER_INTERFACE} is not routed to loopback here")
    workers(1, metrics_port=0)
    [port] = endpoint_ports(settings)
    assert answers("127.0.0.1", port)
    assert not answers(OTHER_INTERFACE, port)

    workers(1, metrics_port=0, metrics_host="0.0.0.0")
    wide = [p for p in endpoint_ports(settings) if p != port]
    assert len(wide) == 1
    assert answers("127.0.0.1", wide[0]) and answers(OTHER_INTERFACE, wide[0])


def _routed_to_loopback() -> bool:
    """Whether this host routes 127.0.0.2 to loopback (a listener on every interface
    answers there)."""
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen(1)
        try:
            with socket.create_connection((OTHER_INTERFACE, listener.getsockname()[1]),
                                          timeout=2):
                return True
        except OSError:
            return False
