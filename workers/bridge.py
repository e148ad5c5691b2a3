"""The gevent <-> asyncio bridge: one asyncio loop per worker process, in a native thread.

Celery's gevent pool runs every task in a greenlet on one OS thread. ``asyncio.run`` per
greenlet breaks (one running loop per thread), and an ``AsyncOpenAI`` client must stay
on the loop that created it. So each worker process owns one long-lived loop in a
*native* thread (the original ``start_new_thread``, not gevent's patched one). A
greenlet hands a coroutine to it with ``run_coroutine_threadsafe`` and sleeps on a
gevent ``async_`` watcher, whose ``send()`` is the one thread-safe way to wake the hub;
the watcher is started before the future's done-callback is attached so a fast
coroutine cannot finish before anyone listens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import gevent
from gevent import monkey

T = TypeVar("T")


class AsyncioBridge:
    """Runs coroutines on a private event loop thread; callable from any greenlet.

    Args:
        name: name of the loop thread (shows up in py-spy and thread dumps).
    """

    def __init__(self, name: str = "rewardq-asyncio") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = monkey.get_original("_thread", "allocate_lock")()
        self._native_thread_id: int | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The bridge's event loop, started on first use."""
        if self._loop is None:
            with self._lock:
                if self._loop is None:
                    self._start()
        assert self._loop is not None
        return self._loop

    def _start(self) -> None:
        # Native primitives only, and nothing that yields to gevent while ``_lock`` is held:
        # a greenlet switch here would let another greenlet block the OS thread on it.
        start_new_thread = monkey.get_original("_thread", "start_new_thread")
        ready = monkey.get_original("_thread", "allocate_lock")()
        ready.acquire()
        box: list[asyncio.AbstractEventLoop] = []

        def main() -> None:
            # Under patch_all this loop selects through gevent, so this thread runs a hub of
            # its own; patched sockets and greenlet "threads" (e.g. run_in_executor) created
            # here keep working. With the raw epoll selector they never ran (measured: the
            # last judge call of a chunk hung until the deadline).
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            box.append(loop)
            ready.release()
            try:
                loop.run_forever()
            finally:
                loop.close()

        start_new_thread(main, ())
        ready.acquire()
        self._loop = box[0]

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the bridge loop and cooperatively wait for its result.

        Args:
            coro: the coroutine to run.
            timeout: seconds to wait; the coroutine is cancelled when it runs out.

        Raises:
            TimeoutError: ``timeout`` passed first.
            BaseException: whatever ``coro`` raised.
        """
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        hub = gevent.get_hub()
        watcher = hub.loop.async_()
        done = gevent.event.Event()
        watcher.start(done.set)
        try:
            future.add_done_callback(lambda _f: watcher.send())
            if not done.wait(timeout) and not future.done():
                future.cancel()
                raise TimeoutError(f"coroutine did not finish within {timeout}s")
            return future.result()
        finally:
            watcher.close()

    def close(self) -> None:
        """Stop the loop thread (pending coroutines are abandoned)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None
