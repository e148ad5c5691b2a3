"""slime's remote reward client, as it is.

Repository: https://github.com/THUDM/slime
Commit: 624b824a898ab0ec1fcb4d373004c7f3852bf515
Path: ``slime/rollout/rm_hub/__init__.py`` (last changed in
4c058f65c3d296db719f6cee9e7e67b2078b3e9c): ``_get_shared_session`` and ``remote_rm``
verbatim; ``async_rm`` and ``batched_async_rm`` keep their ``remote_rm`` path only (the
rule-based reward types and custom functions import slime's math graders).
"""
# ruff: noqa
# mypy: ignore-errors

import asyncio
import logging
import random

import aiohttp

logger = logging.getLogger(__name__)

_shared_session: aiohttp.ClientSession | None = None


def _get_shared_session() -> aiohttp.ClientSession:
    global _shared_session
    if _shared_session is None or _shared_session.closed:
        connector = aiohttp.TCPConnector(
            limit=64,
            enable_cleanup_closed=True,
        )
        timeout = aiohttp.ClientTimeout(total=120)
        _shared_session = aiohttp.ClientSession(connector=connector, timeout=timeout)
    return _shared_session


async def remote_rm(args, sample, max_retries: int = 10):
    payload = {
        "prompt": sample.prompt,
        "response": sample.response,
        "label": sample.label,
    }
    session = _get_shared_session()
    for attempt in range(max_retries):
        try:
            async with session.post(args.rm_url, json=payload) as resp:
                resp.raise_for_status()
                return await resp.json()
        except Exception as e:
            if attempt + 1 >= max_retries:
                logger.warning(f"remote_rm failed after {attempt + 1} attempts: {e}")
                raise
            backoff = min(2**attempt, 30) + random.random()
            logger.info(f"remote_rm: {type(e).__name__}, retrying in {backoff:.1f}s ({attempt + 1}/{max_retries})")
            await asyncio.sleep(backoff)


async def async_rm(args, sample, **kwargs):
    metadata = sample.metadata if isinstance(sample.metadata, dict) else {}
    rm_type = (metadata.get("rm_type") or args.rm_type or "").strip()
    if rm_type == "remote_rm":
        return await remote_rm(args, sample)
    raise NotImplementedError(f"only remote_rm is vendored, not {rm_type!r}")


async def batched_async_rm(
    args,
    samples,
    **kwargs,
) -> list[int | float]:
    tasks = [async_rm(args, sample, **kwargs) for sample in samples]
    rewards = await asyncio.gather(*tasks)
    return rewards


async def close_shared_session() -> None:
    """Not slime's: the tests close the module's shared session between event loops."""
    global _shared_session
    if _shared_session is not None:
        await _shared_session.close()
        _shared_session = None
