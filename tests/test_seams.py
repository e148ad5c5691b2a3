"""The mechanisms several components share, each written once: the token-owned lease
(``rewardq.workers.leases``), the group rendezvous (``rewardq.broker.rendezvous``) and the
text of a chat message (``rewardq.judge.messages``), on a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.asyncio as aioredis
from test_budget import run

from rewardq.broker.rendezvous import RENDEZVOUS_LUA, read_group
from rewardq.judge.messages import message_texts
from rewardq.workers.budget import worst_case_tokens
from rewardq.workers.leases import LEASE_LUA, Leases
from rewardq.workers.rate_limit import estimate_tokens

# A script that takes a lease the way the cache's claim and group judging's join do.
_CLAIM = LEASE_LUA + """
if claim_lease(KEYS[1], ARGV[1], ARGV[2]) then return 1 end
return 0
"""


def test_a_lease_is_claimed_once_renewed_and_released_by_its_token_only(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        claim = client.register_script(_CLAIM)
        leases = Leases(client, ttl_ms=60_000, what="test lease")
        try:
            assert await claim(keys=["a"], args=["mine", 60_000]) == 1
            assert await claim(keys=["a"], args=["theirs", 60_000]) == 0  # held
            leases.hold("a", "mine")
            await client.pexpire("a", 1_000)
            assert await leases.renew() == 1
            assert await client.pttl("a") > 1_000  # pushed out by a full lease
            await leases.release("a", "theirs")  # not its token: nothing happens
            assert await client.get("a") == b"mine"
            assert leases.held == 1
            await leases.release("a", "mine")
            assert await client.get("a") is None
            assert leases.held == 0
        finally:
            await leases.close()

    run(redis_url, body)


def test_a_lease_taken_by_another_owner_is_left_alone_and_no_longer_renewed(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        leases = Leases(client, ttl_ms=60_000)
        try:
            await client.set("a", "mine", px=60_000)
            await client.set("b", "mine", px=60_000)
            leases.hold("a", "mine")
            leases.hold("b", "mine")
            await client.set("b", "theirs", px=5_000)  # ours lapsed, another took it
            assert await leases.renew() == 1
            assert leases.held == 1
            assert await client.pttl("b") <= 5_000  # not extended by our renewal
            await leases.release("b", "mine")
            assert await client.get("b") == b"theirs"
        finally:
            await leases.close()

    run(redis_url, body)


def test_a_held_lease_outlives_its_length_until_its_holder_stops(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> tuple[bytes | None, bytes | None]:
        leases = Leases(client, ttl_ms=1_500)
        await client.set("a", "mine", px=1_500)
        leases.hold("a", "mine")
        await asyncio.sleep(4.0)  # more than two leases: renewed every 0.5 s
        alive = await client.get("a")
        await leases.close()  # a dead holder: the lease lapses
        await asyncio.sleep(2.0)
        return alive, await client.get("a")

    assert run(redis_url, body) == (b"mine", None)


# Join a group with a value, as the producer's group median and group judging do.
_JOIN = RENDEZVOUS_LUA + """
local new, n = join_group(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
local sealed = redis.call('HGET', KEYS[1], 'sealed')
if not sealed and n >= tonumber(ARGV[4]) then
  local values = {}
  for member, value in pairs(group_members(KEYS[1])) do values[#values + 1] = member end
  table.sort(values)
  sealed = seal_group(KEYS[1], table.concat(values, ','))
end
return {new and 1 or 0, n, sealed or false}
"""


def test_a_group_rendezvous_counts_each_member_once_and_keeps_its_first_seal(
        redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        join = client.register_script(_JOIN)
        seal = client.register_script(RENDEZVOUS_LUA + "return seal_group(KEYS[1], ARGV[1])")
        assert join(keys=["g"], args=["a", "1", 60, 3]) == [1, 1, None]
        assert join(keys=["g"], args=["a", "9", 60, 3]) == [0, 1, None]  # a repeat
        assert join(keys=["g"], args=["b", "2", 60, 3]) == [1, 2, None]
        assert join(keys=["g"], args=["c", "3", 60, 3]) == [1, 3, b"a,b,c"]
        assert seal(keys=["g"], args=["another"]) == b"a,b,c"  # the first seal holds
        assert join(keys=["g"], args=["d", "4", 60, 3]) == [1, 4, b"a,b,c"]  # late
        group = read_group(client.hgetall("g"))
        assert group.members == {"a": "1", "b": "2", "c": "3", "d": "4"}
        assert group.sealed == "a,b,c"
        assert group.fields["n"] == "4"
        assert 0 < int(client.ttl("g")) <= 60
        flat = client.eval("return redis.call('HGETALL', KEYS[1])", 1, "g")
        assert read_group(flat) == group  # a script's flat answer reads the same
    finally:
        client.close()


def test_the_message_walker_finds_the_text_both_estimates_count() -> None:
    messages: list[Any] = [
        {"role": "system", "content": "abcd", "name": "judge"},
        {"role": "user", "content": [{"type": "text", "text": "é" * 8},
                                     {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": None}]},
        {"role": "assistant", "content": None},
        "not a message",
    ]
    assert [list(message_texts(m)) for m in messages] == [["abcd"], ["é" * 8], [], []]
    assert list(message_texts(messages[0], ("content", "name"))) == ["abcd", "judge"]
    # The rate limiter: characters of the content, 4 a token, 3 tokens a message.
    assert estimate_tokens(messages[:3], max_tokens=10) == -(-12 // 4) + 3 * 3 + 10
    # The budget: UTF-8 bytes of content and name, 4 tokens a message, 3 to prime.
    prompt, reply = worst_case_tokens({"messages": messages, "n": 2}, 10)
    assert (prompt, reply) == (3 + 4 * 4 + len("abcd") + len("judge") + 16, 20)
