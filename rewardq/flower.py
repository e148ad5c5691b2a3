"""Flower against the configured broker: basic auth from settings, loopback unless auth.

``rewardq flower`` calls :func:`run_flower`, which replaces the process with
``celery -A rewardq.flower:app flower``; tests and scripts call :func:`start_flower`,
which runs the same command as a child process and waits until it answers.

Rules:

- Without a user and password Flower may only listen on a loopback address; asking for
  another address without them raises :class:`~rewardq.broker.errors.ConfigError` before
  anything starts.
- Credentials reach Flower through its environment (``FLOWER_BASIC_AUTH``), never its
  command line, where ``ps`` would show them. The judge API key is removed from
  Flower's environment: Flower never needs it.
- ``persistent=True`` keeps Flower's state (tasks, workers) in a shelve file, saved
  every minute and at exit, and reloaded on the next start.
- Flower's ``/metrics`` (Prometheus) and ``/healthcheck`` stay open even with auth
  (Flower's own choice); its pages and ``/api`` need the credentials.

This module is also the app module the Flower process loads, so ``app`` is built on
first access from the environment: in that process this is the entry point.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
from pydantic import SecretStr

from rewardq.broker.errors import ConfigError, RewardqError
from rewardq.broker.settings import Settings

DEFAULT_PORT = 5555
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_DB = "rewardq-flower.db"
STATE_SAVE_INTERVAL_MS = 60_000
_SECRET_ENV = ("OPENAI_API_KEY", "REWARDQ_JUDGE_API_KEY", "REWARDQ_FLOWER_PASSWORD")


@dataclass(frozen=True)
class FlowerOptions:
    """How to run Flower.

    Attributes:
        port: TCP port (0 is not allowed: Flower would not say which port it took).
        address: interface to bind; anything but loopback requires ``user``/``password``.
        user: basic-auth user; ``None`` with ``password`` ``None`` means no auth.
        password: basic-auth password.
        persistent: keep state in ``db`` across restarts.
        db: the state file (default ``rewardq-flower.db`` in the working directory).
        url_prefix: serve under ``/<prefix>`` (behind a reverse proxy).
    """

    port: int = DEFAULT_PORT
    address: str = DEFAULT_ADDRESS
    user: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    persistent: bool = False
    db: Path | None = None
    url_prefix: str | None = None

    @property
    def auth(self) -> tuple[str, str] | None:
        """``(user, password)`` when basic auth is on."""
        if self.user and self.password is not None and self.password.get_secret_value():
            return self.user, self.password.get_secret_value()
        return None

    def validate(self) -> None:
        """Refuse what would expose an unauthenticated Flower or cannot work.

        Raises:
            ConfigError: a non-loopback address without auth, half-configured auth, a
                user name with ``:``, or a port outside 1..65535.
        """
        if not 0 < self.port < 65536:
            raise ConfigError(f"flower port must be in 1..65535, got {self.port}")
        has_user = bool(self.user)
        has_password = self.password is not None and bool(self.password.get_secret_value())
        if has_user != has_password:
            raise ConfigError("flower basic auth needs both a user and a password "
                              "(REWARDQ_FLOWER_USER and REWARDQ_FLOWER_PASSWORD)")
        if self.user and ":" in self.user:
            raise ConfigError("the flower user name cannot contain ':'")
        if self.auth is None and not is_loopback(self.address):
            raise ConfigError(
                f"refusing to serve Flower on {self.address or 'all interfaces'!r} without "
                "authentication: set REWARDQ_FLOWER_USER and REWARDQ_FLOWER_PASSWORD, or "
                "listen on 127.0.0.1")


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and loopback IPs (``127.0.0.0/8``, ``::1``)."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def options_from_settings(settings: Settings, **overrides: Any) -> FlowerOptions:
    """Flower options from ``settings.flower_user``/``flower_password`` and ``overrides``.

    Overrides whose value is ``None`` are ignored, so CLI defaults fall through.
    """
    values: dict[str, Any] = {"user": settings.flower_user, "password": settings.flower_password}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("password"), str):
        values["password"] = SecretStr(values["password"])
    return FlowerOptions(**values)


def flower_command(settings: Settings, options: FlowerOptions,
                   extra_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run Flower for ``settings`` with ``options``.

    Raises:
        ConfigError: see :meth:`FlowerOptions.validate`.
    """
    from rewardq.stack import settings_env

    options.validate()
    argv = [sys.executable, "-m", "celery", "-A", "rewardq.flower:app", "flower",
            f"--port={options.port}", f"--address={options.address}"]
    if options.persistent:
        db = (options.db or Path(DEFAULT_DB)).expanduser().resolve()
        argv += ["--persistent=True", f"--db={db}",
                 f"--state_save_interval={STATE_SAVE_INTERVAL_MS}"]
    if options.url_prefix:
        argv.append(f"--url_prefix={options.url_prefix}")
    env = settings_env(settings, extra_env)
    for name in (*_SECRET_ENV, "FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"):
        env.pop(name, None)
    if options.auth is not None:
        env["FLOWER_BASIC_AUTH"] = ":".join(options.auth)
    return argv, env


def run_flower(settings: Settings, port: int = DEFAULT_PORT, address: str = DEFAULT_ADDRESS,
               *, user: str | None = None, password: str | SecretStr | None = None,
               persistent: bool = False, db: Path | None = None,
               url_prefix: str | None = None) -> NoReturn:
    """Replace this process with Flower on ``address:port`` against ``settings``' broker.

    Args:
        settings: the broker; ``flower_user``/``flower_password`` give basic auth.
        port: TCP port.
        address: interface; non-loopback needs auth.
        user: overrides ``settings.flower_user``.
        password: overrides ``settings.flower_password``.
        persistent: keep Flower's state in ``db`` across restarts.
        db: the state file.
        url_prefix: serve under this path prefix.

    Raises:
        ConfigError: the refusal rules of :meth:`FlowerOptions.validate`.
    """
    options = options_from_settings(settings, port=port, address=address, user=user,
                                    password=password, persistent=persistent, db=db,
                                    url_prefix=url_prefix)
    argv, env = flower_command(settings, options)
    os.execve(sys.executable, argv, env)


@dataclass
class FlowerProcess:
    """A Flower child process; a context manager that stops it.

    Attributes:
        process: the child.
        url: its root URL, ``http://address:port``.
        auth: the basic-auth pair, if any.
    """

    process: subprocess.Popen[bytes]
    url: str
    auth: tuple[str, str] | None = None
    _http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    def get(self, path: str, **params: Any) -> httpx.Response:
        """``GET`` ``path`` (e.g. ``/api/workers``) with the credentials."""
        return self._http.get(f"{self.url}{path}", params=params or None, auth=self.auth)

    def api(self, path: str, **params: Any) -> Any:
        """``GET`` an API path and decode its JSON.

        Raises:
            httpx.HTTPStatusError: Flower answered an error status.
        """
        response = self.get(path, **params)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        from rewardq.stack import stop_process

        self._http.close()
        stop_process(self.process, grace_s=10)

    def __enter__(self) -> FlowerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_flower(settings: Settings, options: FlowerOptions, *, log_file: Path | None = None,
                 timeout_s: float = 60.0) -> FlowerProcess:
    """Start Flower as a child process and wait until ``/healthcheck`` answers.

    Raises:
        ConfigError: the refusal rules of :meth:`FlowerOptions.validate`.
        RewardqError: Flower exited or did not answer within ``timeout_s``.
    """
    argv, env = flower_command(settings, options)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    host = "127.0.0.1" if options.address in ("", "0.0.0.0") else options.address
    if ":" in host:
        host = f"[{host}]"
    prefix = f"/{options.url_prefix.strip('/')}" if options.url_prefix else ""
    flower = FlowerProcess(process, f"http://{host}:{options.port}{prefix}", options.auth)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            flower.stop()
            raise RewardqError(f"flower exited with status {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if flower.get("/healthcheck").status_code == 200:
                return flower
        time.sleep(0.2)
    flower.stop()
    raise RewardqError(f"flower did not answer on {flower.url} within {timeout_s}s")


def __getattr__(name: str) -> Any:
    # ``celery -A rewardq.flower:app`` in the Flower process: build the app there, from
    # the environment flower_command() passed, and only when Celery asks for it.
    if name == "app":
        from rewardq.broker.app import create_app

        app = create_app(Settings())
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
