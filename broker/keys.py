"""Every Redis key rewardq writes, its type and its TTL, in one place.

=====================================  ======  ============================================
key                                    type    meaning, TTL
=====================================  ======  ============================================
``rewardq:cache:<sha256>``             STRING  JSON ``JudgeVerdict`` for one (spec, item),
                                               without its default fields; TTL
                                               ``Settings.cache_ttl_s``; the only keys
                                               deleted to make room (least recently used
                                               first) while Redis' memory is above
                                               ``Settings.cache_max_memory_ratio`` of its
                                               maxmemory (``rewardq.workers.cache``)
``rewardq:inflight:<sha256>``          STRING  owner token of the one judge call in flight
                                               for that cache key; TTL
                                               ``Settings.inflight_lock_ttl_s``, renewed by
                                               its live owner every third of it (a
                                               token-owned lease,
                                               ``rewardq.workers.leases``)
``rewardq:dead:index``                 ZSET    dead-letter id -> failed-at unix time
``rewardq:dead:<id>``                  STRING  JSON dead letter (payload, error, attempts,
                                               step, timestamps); TTL
                                               ``Settings.dead_letter_ttl_s``
``rewardq:dead:fp:<sha256>``           SET     ids of the ``failed`` / ``budget_exceeded``
                                               item letters of one judge fingerprint, so a
                                               later verdict for that work clears them
                                               (``rewardq.broker.dead_letters``); may name
                                               letters replayed or purged since; TTL
                                               ``Settings.dead_letter_ttl_s``, renewed per
                                               letter
``rewardq:rl:<model>:rpm``             STRING  GCRA theoretical arrival time (requests)
``rewardq:rl:<model>:tpm``             STRING  GCRA theoretical arrival time (tokens)
``rewardq:worker:<node>``              STRING  JSON ``rewardq.broker.fleet.WorkerBeat`` of one live
                                               worker process (Celery node name); rewritten
                                               every ``rewardq.broker.fleet.BEAT_INTERVAL_S`` (2 s),
                                               TTL ``BEAT_TTL_S`` (6 s); deleted on a clean
                                               shutdown
``rewardq:workers``                    SET     node names that have beaten (index of the
                                               above); readers remove members whose beat
                                               expired; no TTL
``rewardq:group:<uid>``                HASH    one GRPO group scored sample by sample
                                               (``rewardq.producer.groups``), a group
                                               rendezvous (``rewardq.broker.rendezvous``):
                                               ``m:<member>`` -> length, ``n`` -> distinct
                                               members, ``sealed`` -> JSON
                                               median/size/status, and ``c:<member>`` ->
                                               arrivals; TTL max(1 h, 2 x the group
                                               wait), renewed per arrival
``rewardq:judgegroup:<sha256>``        HASH    one GRPO group judged together (group
                                               judging, ``rewardq.workers.group_judging``),
                                               keyed by spec and uid, a group rendezvous
                                               (``rewardq.broker.rendezvous``) of item ids:
                                               ``m:<item id>`` -> member fingerprint,
                                               ``n`` -> distinct item ids, ``sealed`` ->
                                               JSON fingerprint -> count once complete;
                                               and ``p:<fingerprint>`` -> item JSON,
                                               ``w:<item id>`` -> the process that brought
                                               it; TTL max(1 h, 2 x the chunk's time
                                               left), renewed per arrival
``rewardq:judgegroup:<sha256>:lock``   STRING  owner token (``<host>:<pid>/<uuid>``) of the
                                               process judging that group; TTL
                                               ``Settings.inflight_lock_ttl_s``, renewed by
                                               its live owner every third of it (a
                                               token-owned lease,
                                               ``rewardq.workers.leases``: a dead owner's
                                               group is taken over)
``rewardq:stats:submit_cache_hits``    STRING  items producers answered from the cache at
                                               submit, never enqueued (INCRBY); no TTL
``rewardq:stats:cache_evictions``      STRING  cache entries deleted to make room (INCRBY);
                                               no TTL
``rewardq:stats:letters_cleared``      STRING  item dead letters cleared because the same
                                               work later got a verdict (INCRBY); no TTL
``rewardq:budget:run:<run>``           HASH    the judge budget of one run, in integer
                                               nano-USD (``BUDGET_UNITS_PER_USD``):
                                               ``limit``, ``step_limit`` (absent or ``none``
                                               = unlimited), ``spent``, ``reserved`` (the
                                               estimates of the calls in flight), ``calls``,
                                               ``refused``, and
                                               ``s:<step>:spent|reserved|refused`` per step
                                               (``rewardq.workers.budget``); TTL 30 days, renewed by
                                               every reserve and settle
``rewardq:budget:holds:<run>``         ZSET    reservations in flight, ``<id>|<estimate>|
                                               <step>|<worst case>`` (nano-USD) -> expiry
                                               (ms, Redis time); expired ones are charged
                                               their worst case by the next reserve; TTL as
                                               the hash
``rewardq:budget:usage:<run>``         HASH    what the run's replies cost per model, the
                                               estimates' source: ``<model>|prompt_ppm``
                                               (prompt tokens billed per million worst-case
                                               prompt tokens), ``<model>|reply_milli``
                                               (completion tokens per reply, in thousandths);
                                               TTL as the hash
``rewardq:budget:runs``                SET     runs that have a budget hash (index of the
                                               above); readers remove runs whose hash
                                               expired; no TTL
``rewardq.judge``                      LIST    the Celery/kombu queue of ``ScoreChunk`` s
``unacked_index``                      ZSET    kombu's unacked delivery tag -> delivery time;
                                               workers bump their own tags every
                                               ``Settings.chunk_lease_s`` / 3 (chunk leases,
                                               ``rewardq.workers.leases.ChunkLeases``); no TTL
``unacked`` / ``unacked_mutex``        HASH /  kombu's unacked messages by tag, and the lock
                                       STRING  of its restore sweep (``chunk_lease_s``)
``rewardq:done:<job id>``              LIST    a chunk's index, pushed by the worker once
                                               the chunk's result is stored: the producer
                                               blocks on it (BLPOP) between polls instead
                                               of sleeping; TTL ``JOB_DONE_TTL_S``
``celery-task-meta-<task id>``         STRING  Celery result of one chunk; TTL
                                               ``Settings.result_expires_s``, cut to
                                               ``READ_RESULT_TTL_S`` once a producer has
                                               read it (``rewardq.broker.jobs.read_chunks``)
=====================================  ======  ============================================
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring as _json_str
from typing import Any

from rewardq.broker.schemas import JudgeSpec, ScoreItem

PREFIX = "rewardq"
DEAD_INDEX = f"{PREFIX}:dead:index"
WORKER_INDEX = f"{PREFIX}:workers"
#: Counter of items answered from the cache at submit (they never reach a worker).
SUBMIT_CACHE_HITS = f"{PREFIX}:stats:submit_cache_hits"
#: Counter of cache entries deleted to make room (``rewardq.workers.cache``).
CACHE_EVICTIONS = f"{PREFIX}:stats:cache_evictions"
#: Counter of item dead letters cleared by a later verdict for the same work
#: (``rewardq.broker.dead_letters``).
DEAD_LETTERS_CLEARED = f"{PREFIX}:stats:letters_cleared"
#: Index of the runs whose judge budget is kept (``budget_key``).
BUDGET_RUNS = f"{PREFIX}:budget:runs"
#: The unit of the budget hashes' amounts: nano-dollars (integers add up exactly).
BUDGET_UNITS_PER_USD = 1_000_000_000
#: A run's budget keys live this long after their last write (every call renews them).
BUDGET_TTL_S = 30 * 24 * 3600


#: ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` without building an
#: encoder per call; the same bytes, so the same keys.
_encode_material = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def judge_fingerprint(spec: JudgeSpec, item: ScoreItem) -> str:
    """SHA-256 over everything that changes the judge's answer for ``item``.

    The hashed bytes are the compact JSON (``ensure_ascii=False``) of the list ``[model,
    prompt_version, temperature, max_tokens, rubric, prompt, response, reference]``, then
    ``score_mode`` unless it is ``"parsed"``, the rubric's digest where the rubric comes
    from a file, and ``"group", mode, size, uid`` for group judging. Ids, uids, data
    sources and metadata do not change the answer and are left out, so the same pair
    submitted under another id is a cache hit. Group judging (``spec.group``) is the
    exception: a member's verdict is relative to its group, so the mode, the size and the
    uid are in its key.
    """
    return judge_fingerprints(spec, (item,))[0]


def judge_fingerprints(spec: JudgeSpec, items: Iterable[ScoreItem]) -> list[str]:
    """``judge_fingerprint`` of each item, with the spec's part of the JSON encoded once.

    The item's strings are encoded one by one with the C string encoder that ``json``
    uses for ``ensure_ascii=False`` (a whole-list ``encode`` per item spent most of its
    time setting an encoder up): the same bytes, for less CPU (``benchmarks/PROFILE.md``).
    """
    head = _encode_material([spec.model, spec.prompt_version, spec.temperature,
                             spec.max_tokens])[:-1]  # "[...,max_tokens" without the "]"
    # Appended only off the defaults, so that keys made before each addition stay valid.
    mode = "" if spec.score_mode == "parsed" else "," + _json_str(spec.score_mode)
    digests = {name: "," + _json_str(digest) for name, digest in spec.rubrics.items()}
    mode += spec.request_key()
    group = "" if spec.group is None else \
        f",{_json_str('group')},{_json_str(spec.group.mode)},{int(spec.group.size)},"
    sha256 = hashlib.sha256
    fingerprints = []
    for item in items:
        reference = item.reference
        rubric = item.rubric or ("correctness" if reference is not None else "quality")
        blob = (f"{head},{_json_str(rubric)},{_json_str(item.prompt)},"
                f"{_json_str(item.response)},{_json_text(reference)}{mode}"
                f"{digests.get(rubric, '')}")
        if group:
            blob += group + _json_text(item.uid)
        fingerprints.append(sha256((blob + "]").encode()).hexdigest())
    return fingerprints


def _json_text(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


#: A job's "chunk done" list lives this long after its last push.
JOB_DONE_TTL_S = 600
#: A chunk's result lives this long once a producer has read it (a second read, e.g. a
#: caller polling twice, still finds it; nobody needs it for the hour Celery keeps it).
READ_RESULT_TTL_S = 10


def job_done_key(job_id: str) -> str:
    """Key of the list of a job's chunks whose results were just stored."""
    return f"{PREFIX}:done:{job_id}"


def cache_key(fingerprint: str) -> str:
    """Key of the cached ``JudgeVerdict`` for a fingerprint."""
    return f"{PREFIX}:cache:{fingerprint}"


def inflight_key(fingerprint: str) -> str:
    """Key of the lock held by the one worker judging a fingerprint right now."""
    return f"{PREFIX}:inflight:{fingerprint}"


def dead_letter_key(letter_id: str) -> str:
    """Key of one dead letter's JSON body."""
    return f"{PREFIX}:dead:{letter_id}"


def dead_fingerprint_key(fingerprint: str) -> str:
    """Key of the set of item dead letters recorded for one judge fingerprint."""
    return f"{PREFIX}:dead:fp:{fingerprint}"


def rate_limit_key(model: str, dimension: str) -> str:
    """Key of the fleet-wide GCRA state for ``model`` (``rpm`` or ``tpm``)."""
    return f"{PREFIX}:rl:{model}:{dimension}"


def worker_key(node: str) -> str:
    """Key of the latest heartbeat of the worker process with Celery node name ``node``."""
    return f"{PREFIX}:worker:{node}"


def chunk_lease_key(transport_options: Mapping[str, Any] | None = None) -> str:
    """Kombu's ZSET of unacked delivery tags whose scores chunk leases renew."""
    return str((transport_options or {}).get("unacked_index_key", "unacked_index"))


def group_key(uid: str) -> str:
    """Key of the hash where the members of GRPO group ``uid`` meet."""
    return f"{PREFIX}:group:{uid}"


def judge_group_key(spec: JudgeSpec, uid: str) -> str:
    """Key of the hash where the members of GRPO group ``uid`` meet to be judged together
    under ``spec`` (group judging: ``spec.group`` set). Everything in ``spec`` that
    changes the group's verdicts is in it, so two specs never mix their members."""
    group = spec.group
    material = [spec.model, spec.prompt_version, spec.temperature, spec.max_tokens,
                group.mode if group else None, group.size if group else None, uid]
    blob = _encode_material(material)
    return f"{PREFIX}:judgegroup:{hashlib.sha256(blob.encode()).hexdigest()}"


def judge_group_lock_key(group_key: str) -> str:
    """Key of the lease held by the one process judging the group at ``group_key``."""
    return f"{group_key}:lock"


def budget_key(run: str) -> str:
    """Key of the hash holding run ``run``'s judge budget: limits, spend, reservations."""
    return f"{PREFIX}:budget:run:{run}"


def budget_usage_key(run: str) -> str:
    """Key of the hash of what run ``run``'s replies cost per model (the estimates' source)."""
    return f"{PREFIX}:budget:usage:{run}"


def budget_holds_key(run: str) -> str:
    """Key of the sorted set of run ``run``'s judge-budget reservations in flight."""
    return f"{PREFIX}:budget:holds:{run}"
