"""The architecture as contracts over the import graph (import-linter's idea, in a test).

Every ``.py`` file of the packages pyproject.toml ships is parsed with ``ast``; every
``import`` and ``from ... import`` counts, also inside functions and ``if TYPE_CHECKING:``
blocks (a lazy import is still a dependency). Importing ``a.b.c`` also runs ``a/__init__`` and
``a/b/__init__``, so those count for the transitive rules.

The layers, top to bottom:

    rewardq         the console script and local stack; may import anything
    producer, workers, monitoring, judge_server (and any other shipped package)
    broker          the contract: imports nothing of ours

- ``producer`` and ``workers`` never import each other, directly or through another
  module (a trainer never loads the worker code, a worker never loads torch-side code);
- ``judge_server`` imports nothing of ours: it stands in for a third-party API and
  shares no code with its clients (``judge_server/config.py``);
- the CLI and ``monitoring`` never import ``workers`` (issue 10, item 4);
- the packages form no import cycle; nothing but ``rewardq`` imports ``rewardq``;
- only entry points read the environment (``os.environ``, ``os.getenv``, or building
  ``Settings(...)``, which pydantic-settings fills from ``REWARDQ_*``).
"""

from __future__ import annotations

import ast
import tomllib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Every package the project ships (so a new one is covered by the general rules).
PACKAGES = tuple(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
                 ["tool"]["setuptools"]["packages"])
TOP = "rewardq"

#: Imports that break a rule today, as (importing file, imported module). Each must be
#: removed from here when it is fixed (a stale entry fails the test), and nothing may be
#: added.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is."""

    importer: str
    target: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    return {_module_name(path): path
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


MODULES = _files()


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    # ``from pkg import sub`` imports the module pkg.sub when there is one.
    submodules = [f"{source}.{alias.name}" for alias in node.names]
    return [name for name in submodules if name in MODULES] or [source]


def _scan() -> list[Import]:
    imports = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, module, path.name == "__init__.py"):
                    if _ours(target):
                        imports.append(Import(module, target, str(path.relative_to(ROOT)),
                                              node.lineno))
    return imports


IMPORTS = _scan()


def _package(module: str) -> str:
    return module.split(".")[0]


def _loaded(target: str) -> list[str]:
    """The modules of ours that ``import target`` runs: it and its parent packages."""
    parts = target.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [name for name in names if name in MODULES]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        graph[imp.importer].update(_loaded(imp.target))
    # A module's own parent packages run before it.
    for module in MODULES:
        graph[module].update(name for name in _loaded(module) if name != module)
    return graph


GRAPH = _graph()


def _chains_into(starts: Iterable[str], forbidden: str) -> list[str]:
    """For each start that reaches a module of package ``forbidden``, the shortest chain."""
    chains = []
    for start in starts:
        parent: dict[str, str | None] = {start: None}
        todo = deque([start])
        while todo:
            module = todo.popleft()
            if _package(module) == forbidden:
                chain = [module]
                while (previous := parent[chain[-1]]) is not None:
                    chain.append(previous)
                chains.append(" -> ".join(reversed(chain)))
                break
            for nxt in sorted(GRAPH[module]):
                if nxt not in parent:
                    parent[nxt] = module
                    todo.append(nxt)
    return chains


def _direct(importer_package: str, allowed: set[str]) -> list[str]:
    return [str(imp) for imp in IMPORTS
            if _package(imp.importer) == importer_package
            and _package(imp.target) not in allowed]


def test_the_scan_sees_the_imports_it_checks() -> None:
    """The rules below would pass vacuously on an empty or half-resolved graph."""
    assert {"broker", "producer", "workers", "monitoring", "judge_server", TOP} <= set(PACKAGES)
    assert set(PACKAGES) <= set(MODULES)
    assert len(MODULES) > 40
    targets = {(imp.importer, imp.target) for imp in IMPORTS}
    assert ("producer.client", "broker.settings") in targets
    assert ("workers.main", "broker.settings") in targets
    # a function-level import
    assert ("rewardq.cli", "producer.client") in targets
    assert "broker.settings" in GRAPH["rewardq"]


def test_producer_and_workers_never_import_each_other() -> None:
    direct = [str(imp) for imp in IMPORTS
              if {_package(imp.importer), _package(imp.target)} == {"producer", "workers"}]
    assert not direct, "\n".join(direct)
    producer = [m for m in MODULES if _package(m) == "producer"]
    workers = [m for m in MODULES if _package(m) == "workers"]
    chains = _chains_into(producer, "workers") + _chains_into(workers, "producer")
    assert not chains, "\n".join(chains)


def test_broker_imports_nothing_of_ours_outside_broker() -> None:
    violations = _direct("broker", {"broker"})
    assert not violations, "\n".join(violations)


def test_judge_server_imports_nothing_of_ours() -> None:
    violations = _direct("judge_server", {"judge_server"})
    assert not violations, "\n".join(violations)


def test_the_cli_and_monitoring_never_import_workers() -> None:
    direct = [str(imp) for imp in IMPORTS
              if _package(imp.importer) in ("monitoring", TOP)
              and _package(imp.target) == "workers"]
    assert not direct, "\n".join(direct)
    starts = ["rewardq.cli", *(m for m in MODULES if _package(m) == "monitoring")]
    chains = _chains_into(starts, "workers")
    assert not chains, "\n".join(chains)


def test_nothing_below_the_top_layer_imports_it() -> None:
    found = [imp for imp in IMPORTS
             if _package(imp.importer) != TOP and _package(imp.target) == TOP]
    new = [str(imp) for imp in found if (imp.path, _target_module(imp)) not in KNOWN_VIOLATIONS]
    assert not new, "\n".join(new)
    stale = KNOWN_VIOLATIONS - {(imp.path, _target_module(imp)) for imp in found}
    assert not stale, f"fixed, so remove from KNOWN_VIOLATIONS: {sorted(stale)}"


def _target_module(imp: Import) -> str:
    return _loaded(imp.target)[-1] if _loaded(imp.target) else imp.target


def _package_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    cycles = []
    for start in sorted(edges):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges[node]):
                if nxt == start:
                    cycles.append([*path, start])
                elif nxt not in path and nxt > start:  # each cycle once, from its least node
                    stack.append((nxt, [*path, nxt]))
    return cycles


def test_the_packages_form_no_import_cycle() -> None:
    edges: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for imp in IMPORTS:
        if (imp.path, _target_module(imp)) in KNOWN_VIOLATIONS:
            continue
        if _package(imp.importer) != _package(imp.target):
            edges[_package(imp.importer)].add(_package(imp.target))
    cycles = _package_cycles(edges)
    report = []
    for cycle in cycles:
        steps = set(zip(cycle, cycle[1:], strict=False))
        report.append(" -> ".join(cycle))
        report += [f"  {imp}" for imp in IMPORTS
                   if (_package(imp.importer), _package(imp.target)) in steps]
    assert not cycles, "\n".join(report)


#: The modules that may read the environment, and the entry point each one is.
ENVIRONMENT_READERS = {
    "rewardq.cli": "the rewardq console script",
    "rewardq.bench": "python -m rewardq.bench, and the asyncio baseline's child process",
    "rewardq.verl": "verl builds RewardqRewardManager / calls compute_score by name",
    "rewardq.stack": "hands this process's environment on to the children it starts",
    "workers.main": "the worker process: celery -A workers.main",
    "rewardq.flower": "the Flower process's app module: celery -A rewardq.flower:app",
    "rewardq.screenshot_flower": "a script run by hand",
    # Library code below: reported in issue 10 (settings should be passed in).
    "producer.client": "RewardClient.from_env()",
    "producer.reward_manager": "Settings() when verl <= 0.6 constructs it without settings",
}


def _environment_reads(module: str, path: Path) -> list[str]:
    reads = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        what = None
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "os" and node.attr in ("environ", "environb", "getenv")):
            what = f"os.{node.attr}"
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                alias.name in ("environ", "environb", "getenv") for alias in node.names):
            what = "from os import environ/getenv"
        elif isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Name) and node.func.id == "Settings")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "Settings")):
            what = "Settings(...)"
        if what is not None:
            reads.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module}: {what}")
    return reads


def test_only_entry_points_read_the_environment() -> None:
    reads = {module: _environment_reads(module, path) for module, path in MODULES.items()}
    assert reads["workers.main"], "the scan finds the worker's Settings()"
    unexpected = [read for module, found in sorted(reads.items())
                  if module not in ENVIRONMENT_READERS for read in found]
    assert not unexpected, "\n".join(unexpected)
    stale = sorted(module for module in ENVIRONMENT_READERS if not reads[module])
    assert not stale, f"no longer read the environment, remove: {stale}"
