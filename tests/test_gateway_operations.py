"""Operations beside the gateway: where the workers' metrics endpoints listen
(``REWARDQ_METRICS_HOST``), and the dead letters a gateway's re-sends leave behind."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from gateway_harness import running_gateway
from scoring_data import expected, make_items

from rewardq.broker.app import create_app
from rewardq.broker.dead_letters import DeadLetters
from rewardq.broker.settings import Settings
from rewardq.monitoring.metrics import discover_endpoints
from rewardq.stack import JudgeProcess

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


@pytest.mark.timeout(180)
def test_an_item_the_gateway_sends_again_until_it_is_scored_leaves_no_dead_letter(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """During a judge outage the item fails in the fleet (a dead letter per try); the
    gateway sends it again, and once it is scored its letters are cleared."""
    workers(1, judge_max_attempts=1)
    judge.configure(error_rate=1.0, error_kinds=["500"])
    item = make_items(1, "resent")[0]
    replies: list[httpx.Response] = []
    letters = DeadLetters.from_settings(settings)
    try:
        with running_gateway(settings) as gateway:
            request = threading.Thread(target=lambda: replies.append(httpx.post(
                f"{gateway.url}/v1/score", json={"items": [item]}, timeout=150)))
            request.start()
            deadline = time.monotonic() + 60
            while not letters.count() and time.monotonic() < deadline:
                time.sleep(0.05)
            lettered = letters.count()
            judge.configure(error_rate=0.0)
            request.join(timeout=150)
        left, cleared = letters.list(), letters.cleared()
    finally:
        letters.close()

    assert lettered >= 1  # the outage did dead-letter the item
    [reply] = replies
    assert reply.status_code == 200, reply.text
    [result] = reply.json()["results"]
    assert result["status"] == "ok" and result["score"] == expected(item)[0]
    assert left == [] and cleared >= 1


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
