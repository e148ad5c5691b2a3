"""One typed settings object, built once at an entry point and passed in.

Only entry points (the CLI, the worker module Celery loads, ``RewardClient.from_env``)
read the environment; everything else receives a :class:`Settings`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rewardq.broker.errors import ConfigError
from rewardq.broker.schemas import JudgeOptions, ReasoningEffort, View

EMBEDDED_REDIS_PORT = 6389
LOCAL_JUDGE_PORT = 8008
#: What a token name may look like: it is a Prometheus label value and goes into dead letters.
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_API_TOKEN_CHARS = 16


def parse_api_tokens(text: str) -> dict[str, SecretStr]:
    """``name:token,name:token`` (``REWARDQ_API_TOKENS``) as token name -> token.

    Raises:
        ValueError: an entry without a name or token, a name that is not
            ``[A-Za-z0-9][A-Za-z0-9_.-]*``, a token shorter than
            ``MIN_API_TOKEN_CHARS``, or a name or token given twice. The message never
            contains a token.
    """
    tokens: dict[str, SecretStr] = {}
    seen: set[str] = set()
    for n, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        name, sep, token = entry.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not token:
            raise ValueError(f"REWARDQ_API_TOKENS entry {n}: expected name:token")
        if not _TOKEN_NAME.fullmatch(name):
            raise ValueError(f"REWARDQ_API_TOKENS entry {n}: name {name!r} must match "
                             f"{_TOKEN_NAME.pattern}")
        if len(token) < MIN_API_TOKEN_CHARS:
            raise ValueError(f"REWARDQ_API_TOKENS entry {n} ({name}): the token is shorter "
                             f"than {MIN_API_TOKEN_CHARS} characters")
        if name in tokens or token in seen:
            raise ValueError(f"REWARDQ_API_TOKENS entry {n} ({name}): the name or the token "
                             f"is given twice")
        tokens[name] = SecretStr(token)
        seen.add(token)
    return tokens


class Settings(BaseSettings):
    """rewardq settings; every field reads ``REWARDQ_<FIELD>`` from the environment.

    The judge API key is the exception: it reads the standard ``OPENAI_API_KEY`` and is
    only ever used inside worker processes (never put in a message, result or log).
    """

    model_config = SettingsConfigDict(env_prefix="REWARDQ_", extra="ignore", frozen=True)

    # Redis: broker, result backend, cache, locks and dead letters.
    redis_url: str | None = Field(
        default=None, description="Unset = the embedded Redis at 127.0.0.1:6389."
    )
    redis_password: SecretStr | None = Field(
        default=None,
        description="Password of that Redis, kept apart from the URL so any characters "
                    "work (as `openssl rand -base64` makes: / + = #); it replaces a "
                    "password written in redis_url.")
    embedded_redis_port: int = EMBEDDED_REDIS_PORT
    celery_broker_url: str | None = Field(
        default=None,
        description="Celery broker if not the Redis above (e.g. amqp:// for RabbitMQ); the "
                    "cache, locks, dead letters and results always live in Redis.")

    # Judge endpoint (OpenAI-compatible chat completions).
    judge_base_url: str = f"http://127.0.0.1:{LOCAL_JUDGE_PORT}/v1"
    judge_model: str = "rewardq-local-judge"
    judge_api_key: SecretStr = Field(
        default=SecretStr("local-judge-needs-no-key"),
        validation_alias=AliasChoices("OPENAI_API_KEY", "REWARDQ_JUDGE_API_KEY"),
    )
    judge_prompt_version: str = "v1"
    judge_temperature: float | None = Field(
        default=0.0,
        description="Sampling temperature of judge calls; not sent to models that take only "
                    "their default (OpenAI's o-series and GPT-5), nor at all when null.")
    judge_max_tokens: int | None = Field(
        default=None, ge=1,
        description="Reply budget of a judge call (sent as max_completion_tokens where a model "
                    "wants it); unset = 64, or 8192 for a judge known to think (o-series, "
                    "GPT-5, R1-style, QwQ, Qwen3). A judge that thinks spends it on its "
                    "thinking first: items whose reply is cut fail naming this setting.")
    judge_reasoning_effort: ReasoningEffort | None = Field(
        default=None,
        description="reasoning_effort sent to the judge (OpenAI reasoning models, vLLM "
                    "gpt-oss); unset = not sent.")
    judge_extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields added to every judge request body as written, as JSON, e.g. "
                    '{"chat_template_kwargs": {"enable_thinking": false}} for Qwen3 on vLLM.')
    judge_options: dict[str, JudgeOptions] = Field(
        default_factory=dict,
        description="Per-judge options by model name, as JSON, over the fleet-wide ones: "
                    "max_tokens, temperature, reasoning_effort, extra_body, "
                    'structured_output; e.g. {"gpt-5-mini": {"reasoning_effort": "low"}}.')
    judge_structured_output: bool = Field(
        default=False,
        description="Ask the judge for {\"score\": <integer>} through response_format (JSON "
                    "schema); an endpoint that refuses it gets plain prompting instead.")
    judge_view: View = Field(
        default="final_answer",
        description="What the judge is shown of a rollout: final_answer (the text after the "
                    "last closing thinking tag) or full (thinking included).")
    judge_view_max_tokens: int = Field(
        default=8192, ge=16,
        description="Most tokens of a rollout shown to the judge (4 characters a token); "
                    "beyond it the head and the tail are kept with a marker between.")
    judge_score_mode: Literal["parsed", "logprobs"] = Field(
        default="parsed",
        description="logprobs: ask for top_logprobs and score the expectation over the "
                    "1-10 tokens (G-Eval); replies without them fall back to the integer.")
    judge_base_urls: list[str] = Field(
        default_factory=list,
        description="Several endpoints serving the same judge models, as a JSON list (e.g. 4 "
                    "vLLM replicas, or a provider and a self-hosted fallback); replaces "
                    "judge_base_url. Calls go to the endpoint with the fewest in flight; "
                    "a failing one is skipped by its circuit breaker.")
    judge_breaker_failures: int = Field(
        default=5, ge=1,
        description="Consecutive failed calls that open an endpoint's circuit breaker.")
    judge_breaker_cooldown_s: float = Field(
        default=10.0, gt=0,
        description="How long an open breaker keeps its endpoint out before a probe call.")
    rubrics_file: Path | None = Field(
        default=None,
        description="A TOML file of judge rubrics (templates selected per item by "
                    "data_source or by the item's rubric); unset = the built-in v1 rubrics. "
                    "Producer and workers must load the same file.")
    judge_ensemble: list[str] = Field(
        default_factory=list,
        description="Judge models asked about every item, as a JSON list (empty = "
                    "judge_model alone); their scores are aggregated by judge_aggregate.")
    judge_samples: int = Field(
        default=1, ge=1, le=16,
        description="Samples per judge and item (use with judge_temperature > 0).")
    judge_aggregate: Literal["mean", "majority"] = "mean"
    judge_group_mode: Literal["listwise", "pairwise"] | None = Field(
        default=None,
        description="Judge items sharing a uid (a GRPO group) together: listwise (one call "
                    "scores the group) or pairwise (every pair, both orders); unset = each "
                    "item alone.")
    judge_group_size: int = Field(default=4, ge=2, le=64,
                                  description="Members per group in group judging.")
    budget_usd: float | None = Field(
        default=None, gt=0,
        description="USD the fleet may spend on judge calls for this run (budget_run), "
                    "enforced through Redis before each call; unset = no limit.")
    budget_step_usd: float | None = Field(
        default=None, gt=0, description="USD per training step (items' step) for this run.")
    budget_run: str = Field(
        default="default", min_length=1, max_length=128,
        description="The run the budget is kept for (a name; spend is counted per run).")
    judge_transport: Literal["direct", "aiohttp", "httpx"] = Field(
        default="direct",
        description="How workers POST to the judge: direct (one aiohttp session per "
                    "endpoint, no SDK) is the default: the openai SDK's request building "
                    "and httpx2 layers cost more CPU than the rest of a judged item "
                    "(benchmarks/PROFILE.md); aiohttp or httpx: the SDK's AsyncOpenAI on "
                    "that transport (e.g. to send the OPENAI_ORG_ID/OPENAI_PROJECT_ID "
                    "headers). Same errors, retries and failover on each.")
    judge_timeout_s: float = Field(default=30.0, gt=0)
    judge_max_attempts: int = Field(default=5, ge=1)
    judge_rpm: int | None = Field(default=None, gt=0)
    judge_tpm: int | None = Field(default=None, gt=0)

    # Worker fleet.
    max_concurrent_requests: int = Field(
        default=256, ge=1, description="Judge requests in flight at once per worker process."
    )
    worker_concurrency: int = Field(default=64, ge=1, description="gevent pool size.")
    chunk_size: int = Field(default=64, ge=1, le=1000, description="Items per Celery task.")
    chunk_deadline_s: float = Field(default=600.0, gt=0)

    # Retention.
    cache_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    result_expires_s: int = Field(default=3600, gt=0)
    dead_letter_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    cache_max_memory_ratio: float = Field(
        default=0.7, gt=0, le=1,
        description="The verdict cache gives way (least recently used verdicts first) "
                    "while Redis' used memory is above this share of its maxmemory, so "
                    "the rest stays free for queued chunks, results and leases, which "
                    "never give way (docs/memory.md). No effect on a Redis without "
                    "maxmemory.")

    # Operations: logs, metrics, cost, Flower.
    log_format: Literal["text", "json"] = Field(
        default="text", description="Worker log lines as text, or one JSON object per line.")
    metrics_port: int | None = Field(
        default=None, description="Prometheus endpoint of each worker process: the first free "
                                  "port from here (0 = any free port); unset = none.")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="The interface the workers' Prometheus endpoints bind: loopback unless "
                    "set (0.0.0.0 where Prometheus scrapes from another host or container).")
    judge_prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="USD per 1M (input, output) tokens per judge model, as JSON, e.g. "
                    '{"gpt-4o-mini": [0.15, 0.6]}; the key "*" prices any other model.')
    flower_user: str | None = None
    flower_password: SecretStr | None = None

    # Reliability: leases, locks and outages (see workers/leases.py, workers/cache.py).
    chunk_lease_s: float = Field(
        default=30.0, gt=0,
        description="A worker renews the lease of every chunk it holds each third of this; "
                    "a chunk whose worker died (SIGKILL, lost host) goes to another worker "
                    "about this long after the last renewal. Workers use it as the Redis "
                    "transport's visibility timeout.")
    inflight_lock_ttl_s: float = Field(
        default=15.0, gt=0,
        description="In-flight judge locks are renewed each third of this by their owner; a "
                    "dead owner's locks expire after it, so waiters take over.")
    reenqueue_lost_chunks: bool = Field(
        default=True,
        description="The producer re-sends a chunk that Redis lost (in no queue, with no "
                    "lease and no result for a few seconds: Redis restarted without its "
                    "data); off = such a wait fails with ChunksLostError.")
    redis_retry_s: float = Field(
        default=30.0, gt=0,
        description="How long workers and the producer keep retrying an unreachable Redis "
                    "(restart, failover) before giving up with BrokerUnavailableError.")

    # HTTP gateway (``rewardq serve``, see gateway/).
    api_tokens: SecretStr | None = Field(
        default=None,
        description="Bearer tokens of the gateway, comma-separated name:token (the name "
                    "labels metrics and dead letters); unset = no auth, loopback only.")
    gateway_max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body (else 413).")
    gateway_max_items: int = Field(default=10_000, ge=1,
                                   description="Most items in one request (else 413).")
    gateway_token_concurrency: int = Field(
        default=1024, ge=1,
        description="Scoring requests per token worked on at once; more wait in the token's "
                    "queue (first in, first out), bounded by gateway_token_queue_items and "
                    "gateway_token_queue_bytes.")
    gateway_retry_after_s: int = Field(default=1, ge=1,
                                       description="Retry-After of a 429 (a token's "
                                                   "queue over its bounds).")
    gateway_rm_timeout_s: float = Field(
        default=100.0, gt=0,
        description="How long a remote-RM request (OpenRLHF, slime) waits for its scores "
                    "before a 504: under slime's 120 s and OpenRLHF's 180 s client timeouts, "
                    "so their retry finds the verdict cached instead of starting over.")
    gateway_label_as: Literal["reference", "metadata"] = Field(
        default="reference",
        description="A remote-RM label becomes the item's reference (correctness rubric) or "
                    "only metadata (quality rubric).")
    gateway_response_from: Literal["strip_prompt", "query"] = Field(
        default="strip_prompt",
        description="OpenRLHF sends the whole decoded sequence as query: strip_prompt judges "
                    "what follows the prompt; query judges the whole sequence.")
    gateway_failed_reward: float | None = Field(
        default=None,
        description="Reward a remote-RM reply gives an item that could not be scored; unset "
                    "= the request fails (502) and the client retries.")
    gateway_token_queue_items: int = Field(
        default=1_000_000, ge=1,
        description="Items one token may have in a gateway process at once, waiting or being "
                    "scored; a request beyond it gets 429 with Retry-After (sized for abuse: "
                    "about 100 steps of 1,024 prompts x 8 rollouts).")
    gateway_token_queue_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=1024,
        description="Request body bytes one token may have in a gateway process at once, "
                    "waiting or being scored; beyond it 429 with Retry-After.")
    gateway_rm_max_items: int = Field(
        default=65_536, ge=1,
        description="Most queries in one OpenRLHF /get_reward request (else 413): an "
                    "old-style whole-step batch, e.g. 1,024 prompts x 16 rollouts = 16,384.")
    gateway_rm_max_body_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024,
        description="Largest body of a remote-RM request (/get_reward, /slime/reward; else "
                    "413); split a larger step with --remote_rm_url URL,URL.")
    gateway_no_answer_reward: float | None = Field(
        default=0.0,
        description="Remote-RM reward of a rollout with no final answer (empty, or its "
                    "thinking never closed): the judge's lowest score; unset = treated like an "
                    "item that could not be scored (gateway_failed_reward, else 502).")
    gateway_openrlhf_extra_logs: bool = Field(
        default=True,
        description="/get_reward answers extra_logs (rewardq_ok, rewardq_cached, "
                    "rewardq_no_answer); false for OpenRLHF 0.8.x, which cannot read them "
                    "(per URL: ?extra_logs=0).")

    @field_validator("judge_base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @field_validator("judge_base_urls")
    @classmethod
    def _strip_slashes(cls, v: list[str]) -> list[str]:
        return [url.rstrip("/") for url in v]

    @property
    def judge_endpoints(self) -> list[str]:
        """The judge's base URLs: ``judge_base_urls``, or ``judge_base_url`` alone."""
        return list(self.judge_base_urls) or [self.judge_base_url]

    @property
    def api_token_names(self) -> dict[str, SecretStr]:
        """The gateway's tokens by name (empty: no auth).

        Parsed here rather than by a validator: pydantic would print the raw input, tokens
        and all, in its error, and only the gateway needs them (other commands start
        whatever this variable holds).

        Raises:
            ConfigError: ``REWARDQ_API_TOKENS`` is malformed (no token in the message).
        """
        if self.api_tokens is None:
            return {}
        try:
            return parse_api_tokens(self.api_tokens.get_secret_value())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def broker_url(self) -> str:
        """The Redis URL every component uses: the configured one or the embedded default,
        with ``redis_password`` put in percent-encoded (redis-py and kombu decode it)."""
        url = self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"
        if self.redis_password is None:
            return url
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        user = quote(unquote(parts.username or ""), safe="")
        secret = quote(self.redis_password.get_secret_value(), safe="")
        return urlunsplit(parts._replace(netloc=f"{user}:{secret}@{host}"))
