"""Running the local judge: in the foreground until a signal, or in a background thread.

``run`` is what ``python -m rewardq.judge_server`` and ``rewardq judge-server`` call; ``serve`` is
the coroutine underneath, for callers that own an event loop; ``BackgroundJudgeServer``
starts one inside the current process (on its own loop in a native thread), for tests
that want a judge without a subprocess. Port 0 binds a free port; every entry point
reports the real one through ``ready_callback`` as the base URL an OpenAI client takes
(``http://HOST:PORT/v1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from rewardq.judge_server.app import SERVICE_KEY, JudgeService, build_app
from rewardq.judge_server.config import DEFAULT_PORT, JudgeConfig

#: Listen backlog: benchmarks open a thousand connections at once.
BACKLOG = 4096
#: How long a stopping server waits for requests in flight (a stalled ``timeout`` fault
#: would otherwise hold the exit for ``timeout_sleep_s``).
SHUTDOWN_GRACE_S = 1.0

ReadyCallback = Callable[[str], None]
LOOPS = ("auto", "uvloop", "asyncio")


def base_url(host: str, port: int) -> str:
    """The OpenAI base URL of a judge listening on ``host:port``."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        OSError: the address is taken or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


async def serve(host: str, port: int, config: JudgeConfig | None = None,
                ready_callback: ReadyCallback | None = None,
                stop: asyncio.Event | None = None,
                app: web.Application | None = None) -> None:
    """Serve the judge on the running loop until ``stop`` is set (or the task is cancelled).

    Args:
        host: interface to bind, e.g. ``127.0.0.1``.
        port: TCP port; 0 picks a free one.
        config: the knobs to start with (ignored when ``app`` is given).
        ready_callback: called with the base URL (``http://HOST:PORT/v1``) once listening.
        stop: set it to shut down; ``None`` serves until cancelled.
        app: an application from :func:`build_app`, to keep a handle on its service.

    Raises:
        OSError: the address cannot be bound.
    """
    app = app if app is not None else build_app(config)
    sock = bind(host, port)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    try:
        await runner.setup()
        await web.SockSite(runner, sock, backlog=BACKLOG).start()
        if ready_callback is not None:
            ready_callback(base_url(host, sock.getsockname()[1]))
        await (stop.wait() if stop is not None else asyncio.Future())
    finally:
        await runner.cleanup()
        sock.close()


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event-loop factory for ``loop``: ``"uvloop"``, ``"asyncio"`` or ``"auto"``.

    ``"auto"`` takes uvloop when it is installed: it cuts the server's CPU per request by
    about a quarter (see ``benchmarks/judge_server_throughput.py``). ``None`` means
    asyncio's default loop.

    Raises:
        ImportError: ``"uvloop"`` asked for but not installed.
        ValueError: an unknown ``loop`` name.
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, not {loop!r}")
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(host: str = "127.0.0.1", port: int = DEFAULT_PORT, config: JudgeConfig | None = None,
        ready_callback: ReadyCallback | None = None, loop: str = "auto") -> None:
    """Serve the judge in the foreground until SIGINT or SIGTERM, then return.

    Must be called from the main thread (it installs the signal handlers).

    Args:
        host: interface to bind.
        port: TCP port; 0 picks a free one.
        config: the knobs to start with.
        ready_callback: called with the base URL (``http://HOST:PORT/v1``) once listening.
        loop: event loop, see :func:`loop_factory`.

    Raises:
        OSError: the address cannot be bound.
        ImportError: ``loop="uvloop"`` but uvloop is not installed.
    """

    async def until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(host, port, config, ready_callback, stop)

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(until_signalled())


class BackgroundJudgeServer:
    """A judge serving from a daemon thread of this process; a context manager.

    Not for gevent-patched processes (start ``python -m rewardq.judge_server`` there instead).

    Args:
        config: the knobs to start with.
        host: interface to bind.
        port: TCP port; 0 (the default) picks a free one.
    """

    def __init__(self, config: JudgeConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.host = host
        self.port = port
        self.app = build_app(config)
        self.base_url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="judge-server", daemon=True)

    @property
    def service(self) -> JudgeService:
        """The running judge's state (read it only; it belongs to the server's thread)."""
        return self.app[SERVICE_KEY]

    def start(self, timeout_s: float = 10.0) -> str:
        """Start serving and return the base URL.

        Raises:
            OSError: the address cannot be bound.
            TimeoutError: the server did not come up within ``timeout_s``.
        """
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"judge server not listening after {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self.base_url

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> BackgroundJudgeServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()

        def ready(url: str) -> None:
            self.base_url = url
            self.port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
            self._ready.set()

        await serve(self.host, self.port, stop=self._stop, ready_callback=ready, app=self.app)
