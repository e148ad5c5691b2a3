"""``rewardq serve`` over real HTTP: a uvicorn child process, real workers, the local judge.

Every test starts the gateway as ``python -m rewardq.cli serve --port 0`` with the test's
settings in its environment (``rewardq.stack.settings_env``) and talks to it with a real
HTTP client: httpx for the rewardq API, aiohttp exactly as OpenRLHF's and slime's
remote-RM clients use it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest
import redis
import torch
from gateway_harness import GatewayProcess, running_gateway
from scoring_data import expected, make_items

from rewardq.broker.app import QUEUE_JUDGE
from rewardq.broker.dead_letters import DeadLetters
from rewardq.broker.settings import Settings
from rewardq.gateway.auth import TOKEN_NAME_KEY
from rewardq.stack import JudgeProcess, settings_env

TEAM_A = "tok-a-" + "A" * 26
TEAM_B = "tok-b-" + "B" * 26
TOKENS = {"REWARDQ_API_TOKENS": f"team-a:{TEAM_A},team-b:{TEAM_B}"}
AUTH_A = {"Authorization": f"Bearer {TEAM_A}"}


@pytest.fixture
def gateway(settings: Settings) -> Iterator[GatewayProcess]:
    """The gateway with two tokens (team-a, team-b) and the test's settings."""
    with running_gateway(settings, extra_env=TOKENS) as gw:
        yield gw


def http(gw: GatewayProcess) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=120)


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    """One sample of the gateway's ``/metrics`` (0 when absent)."""
    text = httpx.get(f"{gw.url}/metrics", headers=AUTH_A, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_score_1000_items_all_ok_in_input_order_equal_to_the_judge(
        settings: Settings, workers, judge: JudgeProcess, gateway: GatewayProcess) -> None:
    workers(2)
    items = make_items(1000, "gw")
    with http(gateway) as client:
        reply = client.post("/v1/score", json={"items": items, "step": 7}, headers=AUTH_A)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["id"] for r in results] == [i["id"] for i in items]
    assert {r["status"] for r in results} == {"ok"}
    assert [(r["score"], r["raw_score"]) for r in results] == [expected(i) for i in items]
    assert judge.stats()["requests_total"] == 1000
    assert metric(gateway, "rewardq_gateway_items_total", token="team-a", status="ok",
                  cached="false") == 1000


def test_stream_sends_the_first_result_while_chunks_are_still_being_judged(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    # One worker taking one chunk of 8 at a time, 100 ms per judge call: the 3 chunks
    # are judged one after another, so the judge sees chunk k+1 only once chunk k is done.
    workers(1, worker_concurrency=1, max_concurrent_requests=8)
    judge.configure(latency_ms=100)
    items = make_items(24, "stream")
    first_line: dict[str, Any] | None = None
    judge_calls_at_first_line = -1
    lines = []
    with running_gateway(settings.model_copy(update={"chunk_size": 8}),
                         extra_env=TOKENS) as gw, http(gw) as client, client.stream(
            "POST", "/v1/score/stream", json={"items": items}, headers=AUTH_A) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        for raw in reply.iter_lines():
            line = json.loads(raw)
            if first_line is None:
                first_line = line
                judge_calls_at_first_line = judge.stats()["requests_total"]
            lines.append(line)
    assert first_line is not None
    # The order of events: when the first result was on the wire, chunks were pending
    # (the gateway says how many) and the judge had not yet been asked about every item.
    assert first_line["pending_chunks"] >= 1, first_line
    assert judge_calls_at_first_line < len(items), judge_calls_at_first_line
    *results, end = lines
    assert end == {"done": True, "count": 24, "chunks": 3, "cache_hits": 0}
    assert sorted(line["index"] for line in results) == list(range(24))
    pending = [line["pending_chunks"] for line in results]
    assert pending == sorted(pending, reverse=True) and pending[-1] == 0
    for line in results:
        item = items[line["index"]]
        assert line["result"]["id"] == item["id"]
        assert (line["result"]["score"], line["result"]["raw_score"]) == expected(item)


def test_refusals_401_413_422_and_nothing_enqueued(
        settings: Settings, redis_url: str) -> None:
    small = settings.model_copy(update={"gateway_max_body_bytes": 4096,
                                        "gateway_max_items": 5})
    items = make_items(3, "bad")
    with running_gateway(small, extra_env=TOKENS) as gw, http(gw) as client:
        body = {"items": items}
        missing = client.post("/v1/score", json=body)
        assert missing.status_code == 401
        assert missing.json()["error"] == "unauthorized"
        assert "Bearer" in missing.headers["www-authenticate"]
        wrong = client.post("/v1/score", json=body,
                            headers={"Authorization": f"Bearer {TEAM_A[:-1]}x"})
        assert wrong.status_code == 401
        basic = base64.b64encode(f"team-a:{TEAM_B[:-1]}".encode()).decode()
        assert client.post("/v1/score", json=body,
                           headers={"Authorization": f"Basic {basic}"}).status_code == 401
        scraped = client.get("/metrics")  # Prometheus scrapes without a token
        assert scraped.status_code == 200
        assert TEAM_A not in scraped.text and TEAM_B not in scraped.text
        assert client.get("/healthz").status_code == 200  # probes need no token
        spec = client.get("/openapi.json").json()
        assert {"/v1/score", "/v1/score/stream", "/get_reward", "/slime/reward",
                "/readyz"} <= set(spec["paths"])

        oversize = {"items": [{**items[0], "response": "x" * 5000}]}
        too_big = client.post("/v1/score", json=oversize, headers=AUTH_A)
        assert too_big.status_code == 413 and too_big.json()["error"] == "too_large"
        # A chunked upload declares no length: it is cut off as it passes the limit.
        chunked = client.post("/v1/score", headers=AUTH_A, content=iter(
            [json.dumps(oversize).encode()[i:i + 1000] for i in range(0, 6000, 1000)]))
        assert chunked.status_code == 413
        too_many = client.post("/v1/score", headers=AUTH_A, json={
            "items": [{"id": str(i), "prompt": "p", "response": "r"} for i in range(6)]})
        assert too_many.status_code == 413

        invalid = [items[0], {**items[1], "prompt": ""},
                   {"id": 5, "prompt": "p", "response": "r"}]
        refused = client.post("/v1/score", json={"items": invalid}, headers=AUTH_A)
        assert refused.status_code == 422
        problems = refused.json()["problems"]
        assert {"item": 1, "id": items[1]["id"], "field": "prompt"} == {
            k: problems[0][k] for k in ("item", "id", "field")}
        assert (problems[1]["item"], problems[1]["field"]) == (2, "id")
        assert "item 1" in refused.json()["message"]
        assert client.post("/v1/score", json={"items": items, "step": -1},
                           headers=AUTH_A).json()["problems"][0]["field"] == "step"
        assert client.post("/v1/score", content=b"{not json", headers=AUTH_A).status_code == 400
        assert metric(gw, "rewardq_gateway_requests_total", endpoint="/v1/score",
                      token="unauthenticated", code="401") == 3
    db = redis.Redis.from_url(redis_url)
    assert db.llen(QUEUE_JUDGE) == 0
    assert db.dbsize() == 0  # no chunk, no result, no cache entry: nothing was sent


def test_without_a_worker_readyz_and_scoring_answer_503_and_readyz_200_with_one(
        settings: Settings, workers, gateway: GatewayProcess) -> None:
    with http(gateway) as client:
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json() | {"message": ""} == {"ready": False, "redis": True,
                                                      "workers": 0, "message": ""}
        assert client.get("/healthz").status_code == 200
        # A request waits for a worker within its deadline, and says why it got none.
        orphan = client.post("/v1/score", json={"items": make_items(2, "orphan"),
                                                "timeout_s": 2}, headers=AUTH_A)
        assert orphan.status_code == 503 and orphan.json()["error"] == "no_workers"
        # One that a worker joins meanwhile is scored.
        late: dict[str, httpx.Response] = {}
        waiting = threading.Thread(target=lambda: late.setdefault("reply", client.post(
            "/get_reward", headers=AUTH_A, json={"query": ["What is 1 + 1? 2"],
                                                 "prompts": ["What is 1 + 1? "],
                                                 "labels": ["2"]})))
        waiting.start()
        workers(1)
        waiting.join()
        assert late["reply"].status_code == 200, late["reply"].text
        assert late["reply"].json()["rewards"] == [expected(
            {"prompt": "What is 1 + 1? ", "response": "2", "reference": "2"})[0]]
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"ready": True, "redis": True, "workers": 1}


def test_a_token_beyond_its_concurrency_waits_its_turn_and_429_comes_only_past_its_queue_bounds(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    workers(1)
    judge.configure(latency_ms=1500)
    one_each = settings.model_copy(update={"gateway_token_concurrency": 1,
                                           "gateway_token_queue_items": 5,
                                           "gateway_retry_after_s": 2})
    with running_gateway(one_each, extra_env=TOKENS) as gw, http(gw) as client:
        replies: dict[str, httpx.Response] = {}

        def post(name: str, n: int) -> threading.Thread:
            thread = threading.Thread(target=lambda: replies.setdefault(name, client.post(
                "/v1/score", json={"items": make_items(n, name)}, headers=AUTH_A)))
            thread.start()
            return thread

        first = post("slow", 2)
        try:
            _wait_for(lambda: metric(gw, "rewardq_gateway_requests_in_flight",
                                     token="team-a") == 1)
            second = post("queued", 2)  # the token's one slot is taken: it waits
            _wait_for(lambda: metric(gw, "rewardq_gateway_requests_queued",
                                     token="team-a") == 1)
            # 2 + 2 items held; 2 more would pass the bound of 5: refused at once.
            over = client.post("/v1/score", json={"items": make_items(2, "over")},
                               headers=AUTH_A)
            assert over.status_code == 429, over.text
            assert over.headers["retry-after"] == "2"
            assert over.json()["error"] == "too_many_requests"
            assert "REWARDQ_GATEWAY_TOKEN_QUEUE_ITEMS" in over.json()["message"]
            other = client.post("/v1/score", json={"items": make_items(1, "other")},
                                headers={"Authorization": f"Bearer {TEAM_B}"})
            assert other.status_code == 200  # each token has its own queue
        finally:
            first.join()
        second.join()
        assert replies["slow"].status_code == 200
        assert replies["queued"].status_code == 200
        assert [r["status"] for r in replies["queued"].json()["results"]] == ["ok", "ok"]
        assert metric(gw, "rewardq_gateway_requests_in_flight", token="team-a") == 0
        # A request's own timeout: 504, or with partial the unfinished items as timeout.
        late = {"items": make_items(2, "late"), "timeout_s": 0.3}
        assert client.post("/v1/score", json=late, headers=AUTH_A).status_code == 504
        partial = client.post("/v1/score", json={**late, "partial": True}, headers=AUTH_A)
        assert partial.status_code == 200
        assert [r["status"] for r in partial.json()["results"]] == ["timeout", "timeout"]


def _wait_for(condition: Any, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


# OpenRLHF and slime build their requests and read the replies as below.

def openrlhf_payload(query: str, prompt: str, label: Any) -> dict[str, Any]:
    """The JSON OpenRLHF's remote-RM client posts for one finished rollout.

    Built the way ``SingleTurnAgentExecutor.execute`` and ``_fetch_rewards_via_http``
    build it in ``openrlhf/utils/agent.py`` (OpenRLHF commit
    3c3be6234e0cb353e76bb8019947db9dfe99fca7; that file last changed in
    ed62d0e20dea08397251eba5e010ee9dabc4d048): ``query`` is the decoded prompt +
    response token ids (``skip_special_tokens=False``), ``prompts`` the prompt, and
    ``labels`` the dataset label, each as a one-element list (one server: the batch is
    not split). ``query = prompt + response`` stands for that decode: the tokenizer
    round-trips these ASCII strings.
    """
    return {"query": [query], "prompts": [prompt], "labels": [label]}


async def openrlhf_reward(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Post and parse the way OpenRLHF does (``_post_request`` and the code after it):
    an aiohttp session with ``ClientTimeout(total=180)``, ``raise_for_status``, ``json``;
    ``rewards_info_list[0]``, ``scores`` falling back to ``rewards``, ``extra_logs`` or
    ``{}``; then ``samples_generator._process_response_into_experience`` makes tensors of
    them (``torch.tensor([reward_val])``)."""
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            session.post(url, json=payload) as response:
        response.raise_for_status()
        rewards_info_list = [await response.json()]
    rewards_info = rewards_info_list[0]
    score_value = rewards_info.get("scores")
    if score_value is None:
        score_value = rewards_info.get("rewards")
    reward_val = rewards_info.get("rewards")
    extra_logs = rewards_info.get("extra_logs") or {}
    return {"reply": rewards_info, "reward": torch.tensor([reward_val]),
            "score": torch.tensor([score_value]),
            "extra_logs": {k: torch.tensor([v]) for k, v in extra_logs.items()}}


async def slime_reward(url: str, prompt: Any, response: str, label: Any) -> Any:
    """slime's ``remote_rm`` (``slime/rollout/rm_hub/__init__.py``, slime commit
    624b824a898ab0ec1fcb4d373004c7f3852bf515): ``{"prompt", "response", "label"}``
    posted with a 120 s session timeout; the reply's JSON is the reward."""
    payload = {"prompt": prompt, "response": response, "label": label}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, \
            session.post(url, json=payload) as resp:
        resp.raise_for_status()
        return await resp.json()


def test_openrlhf_and_slime_remote_rm_clients_work_unchanged(
        settings: Settings, workers, judge: JudgeProcess, gateway: GatewayProcess) -> None:
    workers(1)
    items = [i for i in make_items(48, "orlhf") if "reference" in i][:32]
    # The token rides in the URL, as --reward.remote_url / --rm-url can carry it.
    root = gateway.url.replace("http://", f"http://team-a:{TEAM_A}@")

    async def rollouts() -> list[dict[str, Any]]:
        # The executor scores every finished rollout at once, one request each.
        return await asyncio.gather(*(openrlhf_reward(
            f"{root}/get_reward", openrlhf_payload(i["prompt"] + i["response"], i["prompt"],
                                                   i.get("reference"))) for i in items))

    rewards = asyncio.run(rollouts())
    for item, got in zip(items, rewards, strict=True):
        score, _raw = expected(item)
        assert got["reply"]["rewards"] == got["reply"]["scores"] == [score]
        assert got["reward"].flatten().tolist() == pytest.approx([score])  # float32
        assert got["score"].flatten().tolist() == pytest.approx([score])
        assert got["extra_logs"]["rewardq_ok"].flatten().tolist() == [1.0]
    # 32 concurrent one-sample requests were coalesced into few chunks, not 32 tasks.
    assert metric(gateway, "rewardq_gateway_chunks_sent_total") < 8
    assert judge.stats()["requests_total"] == 32

    # A label used as metadata only switches the judge to the quality rubric.
    first = items[0]
    as_meta = asyncio.run(openrlhf_reward(
        f"{root}/get_reward?label_as=metadata",
        openrlhf_payload(first["prompt"] + first["response"], first["prompt"], "7")))
    no_ref = {k: v for k, v in first.items() if k != "reference"}
    assert as_meta["reply"]["rewards"] == [expected(no_ref)[0]]

    fresh = make_items(2, "slime")
    text = asyncio.run(slime_reward(f"{root}/slime/reward", fresh[0]["prompt"],
                                    fresh[0]["response"], fresh[0].get("reference")))
    assert text == expected(fresh[0])[0]
    chat = asyncio.run(slime_reward(
        f"{root}/slime/reward?reply=dict", [{"role": "user", "content": fresh[1]["prompt"]}],
        fresh[1]["response"], fresh[1].get("reference")))
    assert chat["status"] == "ok" and isinstance(chat["reward"], float)


def test_unscored_items_fail_the_remote_rm_request_or_take_the_set_reward_and_dead_letters_name_the_token(  # noqa: E501
        settings: Settings, workers, judge: JudgeProcess, gateway: GatewayProcess) -> None:
    workers(1)
    judge.configure(error_rate=1.0, error_kinds=["400"])  # permanent: no retries
    item = make_items(1, "dead")[0]
    headers = {"Authorization": f"Bearer {TEAM_B}"}
    body = openrlhf_payload(item["prompt"] + item["response"], item["prompt"],
                            item["reference"])
    with http(gateway) as client:
        failed = client.post("/get_reward", json=body, headers=headers)
        assert failed.status_code == 502 and failed.json()["error"] == "not_scored"
        fixed = client.post("/get_reward?failed_reward=-1", json=body, headers=headers)
        assert fixed.status_code == 200
        assert fixed.json()["rewards"] == [-1.0]
        assert fixed.json()["extra_logs"]["rewardq_ok"] == [0.0]
    letters = DeadLetters.from_settings(settings)
    try:
        found = letters.list()
    finally:
        letters.close()
    assert found and all(letter.payload["metadata"][TOKEN_NAME_KEY] == "team-b"
                         for letter in found)


def test_serve_refuses_a_public_address_without_tokens(settings: Settings) -> None:
    def serve(host: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rewardq.cli", "serve", "--host", host, "--port", "0"],
            env=settings_env(settings, env), capture_output=True, text=True, timeout=60)

    public = serve("0.0.0.0", {"REWARDQ_API_TOKENS": ""})
    assert public.returncode == 2
    assert "without authentication" in public.stderr and "REWARDQ_API_TOKENS" in public.stderr
    malformed = serve("0.0.0.0", {"REWARDQ_API_TOKENS": "team-a:short-secret"})
    assert malformed.returncode == 2
    assert "shorter than" in malformed.stderr and "short-secret" not in malformed.stderr
