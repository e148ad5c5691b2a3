"""Package code tells what is; how it came to be is told elsewhere.

The comments and string literals (docstrings, settings' descriptions, messages) of every
module of the ``rewardq`` package carry no issue numbers, no before/after timings and no
citation of a file that is not in the repository. Measurements belong in ``benchmarks/``
(``RESULTS.md``, with the host they ran on), history in ``CHANGELOG.md``, design notes in
``docs/internals.md``.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rewardq"

_UNIT = r"(?:ms|µs|us|ns|s|sec|seconds?|minutes?)"
_NUMBER = r"\d[\d.,]*"

RULES: dict[str, re.Pattern[str]] = {
    # "issue 14", "issue #3", "issues 5 and 6", "PR #12", "GH-7".
    "issue number": re.compile(
        r"\b(?:issues?|PR|pull request)\s*#?\s*\d+|\bGH-\d+", re.IGNORECASE),
    # "1.7 -> 0.9 ms", "11-15 ms", "3x faster", "faster than", "measured ... 2 ms", a date.
    "timing": re.compile(
        rf"{_NUMBER}\s*{_UNIT}?\s*(?:->|→|=>)\s*[~≈]?{_NUMBER}\s*{_UNIT}\b"
        rf"|\b{_NUMBER}\s*(?:-|–|to)\s*{_NUMBER}\s*(?:ms|µs|us|ns)\b"
        rf"|\b{_NUMBER}\s*(?:x|×|times)\s+(?:faster|slower|quicker)\b"
        r"|\b(?:faster|slower)\s+than\b"
        rf"|\bmeasured\b[^.\n]{{0,60}}?{_NUMBER}\s*(?:ms|µs|us|ns)\b"
        r"|\b20\d\d-[01]\d-[0-3]\d\b",
        re.IGNORECASE),
    # Files that are not in the repository (a path that is, such as docs/memory.md, may be
    # named: test_cited_paths_exist checks that).
    "outside file": re.compile(r"\b(?:DESIGN|STYLE)\.md\b|\.\./shared\b"),
}

# Files owned by others while this test came in, with the rules they still break: each
# entry goes once its file is clean (test_allow_list_only_shrinks fails until it does).
# Files outside the package that still cite one outside the repository are in
# CITING_OUTSIDE, on the same terms.
CITING_OUTSIDE: set[str] = set()
ALLOWED: dict[str, set[str]] = {
}


def package_files() -> list[Path]:
    """Every module of the installed package, by its real path (the component folders are
    linked into ``rewardq/``), once."""
    found: set[Path] = set()
    for folder, _, names in os.walk(PACKAGE, followlinks=True):
        found.update(Path(folder, name).resolve() for name in names if name.endswith(".py"))
    return sorted(found)


def texts(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of every comment and string literal of a module."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def violations(path: Path) -> dict[str, list[str]]:
    """Rule -> ``"line: excerpt"`` of each place in ``path`` that breaks it."""
    found: dict[str, list[str]] = {}
    for line, text in texts(path):
        for rule, pattern in RULES.items():
            for match in pattern.finditer(text):
                excerpt = text[max(match.start() - 30, 0):match.end() + 30].replace("\n", " ")
                found.setdefault(rule, []).append(f"{line}: ...{excerpt}...")
    return found


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        ("issue number", "the HTTP exchange itself (issue 5)"),
        ("issue number", "see issue #3"),
        ("issue number", "before Issue14 landed"),
        ("issue number", "fixed in PR #12"),
        ("timing", "1.7 -> 0.9 ms per call"),
        ("timing", "2,048 items: 6.9 → 2.3 ms"),
        ("timing", "11-15 ms as two passes"),
        ("timing", "0.9 to 1.0 ms side by side"),
        ("timing", "the same bytes, 3x faster"),
        ("timing", "One sort is 2-4 times slower"),
        ("timing", "several times faster than numpy's argsort"),
        ("timing", "was measured at about 1.5 ms back to back"),
        ("timing", "on 2024-05-01 the host"),
        # Built from parts, so that this file itself cites nothing outside the repository.
        ("outside file", "formulas in " + "DESIGN" + ".md"),
        ("outside file", "as " + "STYLE" + ".md asks"),
        ("outside file", "see " + "../" + "shared/notes"),
    ],
)
def test_each_rule_finds_what_it_is_for(rule: str, text: str) -> None:
    assert RULES[rule].search(text), (rule, text)


@pytest.mark.parametrize(
    "text",
    [
        "a suffix on the fingerprint (``#1``, ``#2``)",  # not an issue
        "The defaults, 20 ms and 30 ms, give 52 per second",  # settings, not history
        "waits up to 25 ms",
        "timeout_ms: int = 500",
        "350 ms: 0.35 s",
        "see docs/memory.md",
        "ids in [0, number_of_groups)",
        "a linear ramp to max_penalty at 2x the median",
    ],
)
def test_rules_leave_plain_statements_alone(text: str) -> None:
    assert not [rule for rule, pattern in RULES.items() if pattern.search(text)], text


def test_the_scan_reaches_every_component() -> None:
    files = {relative(path).split("/")[0] for path in package_files()}
    for component in ("rewardq", "broker", "judge", "workers", "producer", "gateway",
                      "monitoring", "judge_server"):
        assert component in files, component


def test_package_code_carries_no_history() -> None:
    broken: list[str] = []
    for path in package_files():
        allowed = ALLOWED.get(relative(path), set())
        for rule, places in violations(path).items():
            if rule not in allowed:
                broken += [f"{relative(path)}:{place} [{rule}]" for place in places]
    assert not broken, (
        "package code tells what is: move measurements to benchmarks/RESULTS.md (with the "
        "host), history to CHANGELOG.md, design notes to docs/internals.md, and cite no "
        "file outside the repository:\n" + "\n".join(broken))


def test_allow_list_only_shrinks() -> None:
    stale = [f"{name} [{rule}]" for name, rules in ALLOWED.items() for rule in rules
             if rule not in violations(ROOT / name)]
    assert not stale, "clean now, take these out of ALLOWED:\n" + "\n".join(stale)


# What git ignores (.gitignore) and git's own folder: not the repository's text.
_NOT_SOURCE = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
               ".hypothesis", "build", "bench-results"}


def repository_files() -> list[str]:
    """The repository's files (the links into ``rewardq/`` not followed), but this one,
    which names what it looks for."""
    found: list[str] = []
    for folder, folders, names in os.walk(ROOT):
        folders[:] = [name for name in folders if name not in _NOT_SOURCE
                      and not name.endswith(".egg-info")
                      and not Path(folder, name).is_symlink()]
        found += [relative(Path(folder, name)) for name in names
                  if not Path(folder, name).is_symlink()]
    return sorted(name for name in found if name != "tests/test_code_text.py")


def citing_outside(name: str) -> bool:
    try:
        text = (ROOT / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a binary file
        return False
    return bool(RULES["outside file"].search(text))


def test_no_file_cites_one_outside_the_repository() -> None:
    citing = {name for name in repository_files() if citing_outside(name)}
    assert not citing - CITING_OUTSIDE, sorted(citing - CITING_OUTSIDE)
    assert not CITING_OUTSIDE - citing, (
        f"clean now, take these out of CITING_OUTSIDE: {sorted(CITING_OUTSIDE - citing)}")


def test_cited_paths_exist() -> None:
    """A file of the repository that package code names by its path (``docs/memory.md``,
    ``benchmarks/bench_soak.py``) is there."""
    cited = re.compile(r"(?<![\w/.])(?:docs|benchmarks|tests|examples)/[\w./-]*\w")  # no URLs
    missing: list[str] = []
    for path in package_files():
        for line, text in texts(path):
            for match in cited.finditer(text):
                if not (ROOT / match.group(0)).exists():
                    missing.append(f"{relative(path)}:{line}: {match.group(0)}")
    assert not missing, "\n".join(missing)
