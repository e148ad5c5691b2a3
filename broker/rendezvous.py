"""A group rendezvous in Redis: members join one by one, until N; then it is sealed once.

A GRPO group's members reach the fleet one by one, on different processes. Where they
must be taken together (the producer's group median, ``rewardq.producer.groups``; group
judging, ``rewardq.workers.group_judging``), each one joins the group's hash, and the
process that sees the group complete writes the *seal*, the decision every member then
reads: the first seal written holds, so all members, late ones included, agree.

The hash (its key and its other fields in ``rewardq.broker.keys``):

- ``m:<member>`` -> the member's value, as its first arrival wrote it: a member that
  joins again (a repeat, a poll, a redelivered chunk) counts once;
- ``n`` -> how many distinct members joined;
- ``sealed`` -> the seal, written once.

Every join renews the hash's TTL. The Lua functions of :data:`RENDEZVOUS_LUA` are for the
scripts that join or seal a group together with what else they do atomically (such a
script starts with it); :func:`read_group` reads the hash back in Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rewardq.broker.connections import reply_text

__all__ = ["MEMBER", "RENDEZVOUS_LUA", "SEALED", "Rendezvous", "read_group"]

#: Prefix of a member's field: ``m:<member>`` -> its value.
MEMBER = "m:"
#: The field of the seal.
SEALED = "sealed"

# join_group(h, member, value, ttl): the member joins the group at hash h (its value kept
#   from its first arrival; h's TTL set to ttl seconds). Returns whether it is new, and
#   how many distinct members have joined.
# group_members(h): member -> value, for every member of h.
# seal_group(h, seal): write seal unless h is sealed already; returns the seal that holds.
RENDEZVOUS_LUA = f"""
local function join_group(h, member, value, ttl)
  local new = redis.call('HSETNX', h, '{MEMBER}' .. member, value) == 1
  if new then redis.call('HINCRBY', h, 'n', 1) end
  redis.call('EXPIRE', h, tonumber(ttl))
  return new, tonumber(redis.call('HGET', h, 'n'))
end
local function group_members(h)
  local members, all = {{}}, redis.call('HGETALL', h)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, {len(MEMBER)}) == '{MEMBER}' then
      members[string.sub(all[i], {len(MEMBER) + 1})] = all[i + 1]
    end
  end
  return members
end
local function seal_group(h, seal)
  redis.call('HSETNX', h, '{SEALED}', seal)
  return redis.call('HGET', h, '{SEALED}')
end
"""


@dataclass(frozen=True)
class Rendezvous:
    """A group's hash as read back.

    Attributes:
        members: member -> its value.
        sealed: the seal, or ``None`` while the group is open.
        fields: every field of the hash, as text (the users' own fields too).
    """

    members: dict[str, str]
    sealed: str | None
    fields: dict[str, str]


def read_group(state: Mapping[Any, Any] | Sequence[Any]) -> Rendezvous:
    """The group in ``state``: an HGETALL as redis-py answers it (a dict) or as a script
    returns it (a flat list of fields and values), bytes or text."""
    pairs = state.items() if isinstance(state, Mapping) else zip(state[::2], state[1::2],
                                                                   strict=True)
    fields = {reply_text(k): reply_text(v) for k, v in pairs}
    members = {k[len(MEMBER):]: v for k, v in fields.items() if k.startswith(MEMBER)}
    return Rendezvous(members, fields.get(SEALED), fields)


