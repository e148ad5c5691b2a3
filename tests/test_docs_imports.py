"""What the README and the docs tell a user to import exists, from an installed rewardq.

Every ``import`` / ``from ... import`` statement of a Python code block (``python``, ``py``,
``pycon``) in README.md and ``docs/**/*.md`` runs, each page's in a fresh interpreter
started outside the repository (so the statements import what is installed, not the
checkout, and load nothing into the test process). Every ``rewardq.…`` name the pages show
as inline code (``rewardq.integrations.trl.make_trl_reward``, ``rewardq.verl``) resolves to
a module or to an attribute of one.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_FENCES = {"python", "py", "python3", "pycon"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")
_IMPORT_START = re.compile(r"^\s*(?:import\s+[\w.]|from\s+[\w.]+\s+import\b)")
#: A ``rewardq.…`` name as a whole inline code span (a trailing ``()`` allowed).
_INLINE_NAME = re.compile(r"`(rewardq(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")


@dataclass(frozen=True)
class Statement:
    """One import statement of a page, where it is."""

    page: str
    line: int
    code: str


def _code_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of each fenced Python block of a Markdown page."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip().lower()
        language = info.split()[0].strip("{}.") if info else ""
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(
                rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        start = i - len(body) + 1  # 1-based line of the block's first line
        i += 1
        if language in PYTHON_FENCES:
            blocks.append((start, textwrap.dedent("\n".join(body))))
    return blocks


def _console_code(code: str) -> str:
    """A ``pycon`` session's input lines (``>>>`` / ``...``) as a script."""
    lines = code.splitlines()
    if not any(line.startswith(">>>") for line in lines):
        return code
    return "\n".join(line[4:] for line in lines if line.startswith((">>> ", "... ")))


def _statements(code: str) -> list[tuple[int, str]]:
    """``(line offset, source)`` of each import statement of a code block.

    A block that parses gives its import nodes, those inside functions too; a sketch that
    does not parse (``...`` in place of arguments, say) gives its import lines, a
    parenthesized name list followed to its closing parenthesis.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        found = []
        lines = code.splitlines()
        for number, line in enumerate(lines):
            if not _IMPORT_START.match(line):
                continue
            statement = [line.strip()]
            end = number
            while "(" in statement[0] and ")" not in statement[-1] and end + 1 < len(lines):
                end += 1
                statement.append(lines[end].strip())
            found.append((number, " ".join(statement).split("#", 1)[0].strip()))
        return found
    return [(node.lineno - 1, ast.unparse(node)) for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)]


def _page_statements(page: Path) -> list[Statement]:
    name = str(page.relative_to(ROOT))
    return [Statement(name, start + offset, source)
            for start, code in _code_blocks(page.read_text(encoding="utf-8"))
            for offset, source in _statements(_console_code(code))]


STATEMENTS = {page: _page_statements(page) for page in PAGES}
WITH_IMPORTS = [page for page, found in STATEMENTS.items() if found]

#: Run in a child interpreter: a prelude, then each ``(where, what, code)``; the failures
#: are printed as JSON.
_RUNNER = """
import json, sys
prelude, runs = json.loads(sys.argv[1])
scope = {}
exec(prelude, scope)
failures = []
for where, what, code in runs:
    try:
        exec(compile(code, where, "exec"), dict(scope))
    except BaseException as exc:
        failures.append(f"{where}: {what}: {type(exc).__name__}: {exc}")
print(json.dumps(failures))
"""


def _run(tmp_path: Path, runs: list[tuple[str, str, str]], prelude: str = "") -> list[str]:
    """Failures of ``runs`` (``(where, what, code)``), run in order after ``prelude`` in one
    interpreter started in ``tmp_path``."""
    done = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps([prelude, runs])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    failures: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return failures


def test_the_extraction_finds_the_readme_s_imports() -> None:
    """The page tests below would pass vacuously if no statement were found."""
    readme = [s.code for s in STATEMENTS[ROOT / "README.md"]]
    assert any(code.startswith("from rewardq import") for code in readme), readme
    sketch = "```python\nfrom rewardq import (\n    RewardClient,\n    Settings,\n)\nx = f(...)\n"
    [(start, code)] = _code_blocks(sketch + "```\n")
    assert start == 2
    assert _statements(code + "\nfor\n") == [
        (0, "from rewardq import ( RewardClient, Settings, )")]
    session = ">>> import rewardq\n>>> rewardq.__version__\n'0.1.0'"
    assert _statements(_console_code(session)) == [(0, "import rewardq")]


@pytest.mark.processes
@pytest.mark.parametrize("page", WITH_IMPORTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_line_of_the_page_runs(page: Path, tmp_path: Path) -> None:
    failures = _run(tmp_path, [(f"{s.page}:{s.line}", s.code, s.code)
                               for s in STATEMENTS[page]])
    assert not failures, "\n".join(failures)


def _inline_names() -> dict[str, list[str]]:
    """Each ``rewardq.…`` inline-code name of the pages, and where it appears. A name with
    a one-letter part (``rewardq.broker.x``) stands for any module, so is no name."""
    names: dict[str, list[str]] = {}
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for match in _INLINE_NAME.finditer(line):
                name = match[1]
                if any(len(part) == 1 for part in name.split(".")):
                    continue
                names.setdefault(name, []).append(f"{page.relative_to(ROOT)}:{number}")
    return names


#: Resolves a dotted name: the longest importable module, then attributes.
_RESOLVE = """
import importlib

def resolve(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is None or not ".".join(parts[:cut]).startswith(exc.name):
                raise
            continue
        for part in parts[cut:]:
            value = getattr(value, part)
        return value
    raise ModuleNotFoundError(name)

"""


@pytest.mark.processes
def test_every_rewardq_name_the_pages_show_exists(tmp_path: Path) -> None:
    names = _inline_names()
    assert "rewardq.verl" in names, "the trainer pages name the module verl configs use"
    failures = _run(tmp_path, [(", ".join(where), name, f"resolve({name!r})")
                               for name, where in names.items()], prelude=_RESOLVE)
    assert not failures, "\n".join(failures)


#: The names the docs import from ``rewardq`` itself: the front door.
FRONT_DOOR = ("RewardClient", "AsyncRewardClient", "PendingScores", "Settings", "ScoreItem",
              "ScoreResult", "ResultStatus", "LengthPenaltyConfig", "DeadLetters",
              "SyncJudge", "RewardqError", "ConfigError", "InvalidItemError",
              "BrokerUnavailableError", "RedisFullError", "ScoringTimeoutError",
              "NoWorkersError", "ChunksLostError", "JudgeError")

_FRONT_DOOR_CHECK = """
import json, sys
import rewardq, rewardq.integrations
light = sorted(m for m in sys.modules if m != "rewardq.integrations"
               and m.startswith(("rewardq.", "torch", "celery", "redis", "pydantic")))
names = json.loads(sys.argv[1])
homes = {name: getattr(rewardq, name).__module__ for name in names}
import rewardq.verl, rewardq.integrations.verl as adapter
same = all(getattr(rewardq.verl, n) is getattr(adapter, n) for n in rewardq.verl.__all__)
print(json.dumps({"light": light, "homes": homes, "all": sorted(rewardq.__all__),
                  "same": same}))
"""


@pytest.mark.processes
def test_the_front_door_exports_every_public_name_and_loads_none_until_asked(
        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _FRONT_DOOR_CHECK, json.dumps(FRONT_DOOR)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # ``import rewardq`` (a worker, ``rewardq --help``) and the adapters' package load
    # nothing: no client stack, no torch, no Celery.
    assert found["light"] == []
    assert found["all"] == sorted([*FRONT_DOOR, "__version__"])
    # Each name is the class its component defines (one object, whichever path imports it).
    assert all(home.startswith(("rewardq.broker.", "rewardq.producer."))
               for home in found["homes"].values()), found["homes"]
    assert found["homes"]["NoWorkersError"] == "rewardq.broker.errors"
    assert found["homes"]["RewardClient"] == "rewardq.producer.client"
    # The path verl configs name is the adapter itself.
    assert found["same"] is True
