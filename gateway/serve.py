"""``rewardq serve``: the gateway on uvicorn, bound only where it is safe.

Without ``REWARDQ_API_TOKENS`` the gateway accepts anyone, so it binds to loopback
only; any other address needs tokens (the same rule as ``rewardq flower``). The socket
is bound here, before uvicorn starts, so that ``--port 0`` can print the port the OS
picked (``rewardq gateway listening on http://HOST:PORT``).
"""

from __future__ import annotations

import contextlib
import ipaddress

import uvicorn

from rewardq.broker.errors import ConfigError
from rewardq.broker.settings import Settings
from rewardq.gateway.app import create_app

#: The default port of ``rewardq serve``.
GATEWAY_PORT = 8800


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def check_bind(host: str, settings: Settings) -> None:
    """Refuse an address beyond loopback when no token is configured.

    Raises:
        ConfigError: ``host`` is not loopback and ``REWARDQ_API_TOKENS`` is unset (or
            malformed).
    """
    if settings.api_token_names or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve on {host!r} without authentication: set REWARDQ_API_TOKENS "
        f"(comma-separated name:token, e.g. team-a:$(python -c 'import secrets; "
        f"print(secrets.token_urlsafe(32))')) or bind to 127.0.0.1")


def serve(settings: Settings, host: str = "127.0.0.1", port: int = GATEWAY_PORT, *,
          log_level: str = "info", access_log: bool = False) -> int:
    """Serve the gateway in the foreground until SIGINT/SIGTERM; returns the exit status.

    Raises:
        ConfigError: see :func:`check_bind`.
    """
    check_bind(host, settings)
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, lifespan="on", server_header=False)
    sock = config.bind_socket()
    # Listening before it says so: a client that acts on the line below queues in the
    # backlog until the app has started, instead of being refused (uvicorn listens later).
    sock.listen(config.backlog)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"rewardq gateway listening on http://{shown}:{bound_port}", flush=True)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM/SIGINT it caught.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    return 0
