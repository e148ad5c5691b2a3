"""The architecture as contracts over the import graph (import-linter's idea, in a test).

Every ``.py`` file of the packages pyproject.toml ships is parsed with ``ast``; every
``import`` and ``from ... import`` counts, also inside functions and ``if TYPE_CHECKING:``
blocks (a lazy import is still a dependency). Importing ``a.b.c`` also runs ``a/__init__`` and
``a/b/__init__``, so those count for the transitive rules.

One import namespace: the component folders at the top of the repository (``broker/``,
``workers/``, ...) are linked into ``rewardq/`` and import only as ``rewardq.broker``,
``rewardq.workers``, ...; a bare ``import broker`` would load a second copy of the module
(and, installed, fail). The layers, top to bottom:

    rewardq         the console script and local stack (``rewardq.*`` outside the
                    components); may import anything
    producer, workers, monitoring, gateway, judge_server
    judge           the judge domain, pure: imports only the contract
    broker          the contract: imports nothing of ours

- ``producer`` and ``workers`` never import each other, directly or through another
  module (a trainer never loads the worker code, a worker never loads torch-side code);
- ``judge_server`` imports nothing of ours: it stands in for a third-party API and
  shares no code with its clients (``judge_server/config.py``);
- the CLI and ``monitoring`` never import ``workers``;
- the components form no import cycle, and no two modules import each other at run time
  (``if TYPE_CHECKING:`` imports aside); nothing but the top layer imports it;
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
#: The components: ``rewardq.<component>``, each a folder at the top of the repository.
COMPONENTS = tuple(p.split(".", 1)[1] for p in PACKAGES
                   if p != TOP and (ROOT / TOP / p.split(".", 1)[1]).is_symlink())

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
    if parts[0] != TOP:  # a component folder: rewardq.<component>
        parts = (TOP, *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _folder(package: str) -> Path:
    """Where a package's files are: a component's folder at the top, else under rewardq/."""
    name = package.split(".", 1)[1] if package != TOP else TOP
    return ROOT / name if name in COMPONENTS or package == TOP else ROOT / TOP / name


def _files() -> dict[str, Path]:
    return {_module_name(path): path
            for package in PACKAGES for path in sorted(_folder(package).rglob("*.py"))
            if not any(p.is_symlink() for p in path.relative_to(ROOT).parents
                       if p != Path("."))  # rewardq/<component> links: scanned as folders
            and not (ROOT / path.relative_to(ROOT).parts[0]).is_symlink()}


MODULES = _files()


def _ours(name: str) -> bool:
    """Ours: ``rewardq...``, or a bare component name (which the bare-import rule refuses)."""
    return name.split(".")[0] in (TOP, *COMPONENTS)


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


def _runtime_imports(path: Path, module: str) -> set[str]:
    """The modules of ours that ``module`` imports when it runs (at import time or in a
    function), without those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            checking.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in checking:
            for target in _targets(node, module, path.name == "__init__.py"):
                if target in MODULES:
                    found.add(target)
    return found


def _package(module: str) -> str:
    """The component of ``module`` (``rewardq.broker.keys`` -> ``broker``), or ``rewardq``
    for the top layer."""
    parts = module.split(".")
    if parts[0] == TOP and len(parts) > 1 and parts[1] in COMPONENTS:
        return parts[1]
    return parts[0]


def _loaded(target: str) -> list[str]:
    """The modules of ours that ``import target`` runs: it and its parent packages."""
    parts = target.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [name for name in names if name in MODULES]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if imp.importer != TOP:  # the front door: below, what it loads when it runs
            graph[imp.importer].update(_loaded(imp.target))
    # Every module runs the front door (``rewardq/__init__``) first: what it loads when it
    # runs counts, not the names it exports lazily (PEP 562) or only for type checkers.
    graph[TOP] = {name for target in _runtime_imports(MODULES[TOP], TOP)
                  for name in _loaded(target)}
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
    assert {"broker", "producer", "workers", "monitoring", "judge_server"} <= set(COMPONENTS)
    assert set(PACKAGES) <= set(MODULES)
    assert len(MODULES) > 40
    targets = {(imp.importer, imp.target) for imp in IMPORTS}
    assert ("rewardq.producer.client", "rewardq.broker.settings") in targets
    assert ("rewardq.workers.main", "rewardq.broker.settings") in targets
    # a function-level import
    assert ("rewardq.cli", "rewardq.producer.client") in targets
    assert "rewardq.broker.settings" in GRAPH["rewardq.cli"]
    assert "rewardq.producer.client" not in GRAPH[TOP]  # the front door loads it lazily


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


def test_the_judge_domain_imports_only_the_contract() -> None:
    violations = _direct("judge", {"judge", "broker"})
    assert not violations, "\n".join(violations)


def test_judge_server_imports_nothing_of_ours() -> None:
    violations = _direct("judge_server", {"judge_server"})
    assert not violations, "\n".join(violations)


def test_the_trainer_adapters_never_load_the_workers() -> None:
    starts = [m for m in MODULES if m == "rewardq.verl" or m.startswith("rewardq.integrations")]
    assert starts
    chains = _chains_into(starts, "workers")
    assert not chains, "\n".join(chains)


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


def test_every_import_of_ours_names_a_module_we_ship() -> None:
    """A module moved or renamed leaves no import behind (lazy ones included)."""
    missing = [str(imp) for imp in IMPORTS
               if imp.target.split(".")[0] == TOP and imp.target not in MODULES]
    assert not missing, "\n".join(missing)


def test_nothing_imports_a_component_by_its_bare_name() -> None:
    """``rewardq.broker``, never ``broker``: the package, the tests and the benchmarks."""
    bare = []
    files = [*MODULES.values(), *sorted((ROOT / "tests").glob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level \
                else []
            bare += [f"{path.relative_to(ROOT)}:{node.lineno}: import {name}"
                     for name in names if name.split(".")[0] in COMPONENTS]
    assert not bare, "\n".join(bare)


def test_no_two_modules_import_each_other_at_run_time() -> None:
    edges = {module: _runtime_imports(path, module) - {module}
             for module, path in MODULES.items()}
    cycles = [cycle for cycle in _package_cycles(edges)
              if not all(_is_parent(a, b) or _is_parent(b, a)
                         for a, b in zip(cycle, cycle[1:], strict=False))]
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def _is_parent(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def test_the_packages_form_no_import_cycle() -> None:
    edges: dict[str, set[str]] = {package: set() for package in (TOP, *COMPONENTS)}
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
    "rewardq.integrations.verl": "verl builds RewardqRewardManager / calls compute_score by "
                                 "name (through rewardq.verl)",
    "rewardq.stack": "hands this process's environment on to the children it starts",
    "rewardq.workers.main": "the worker process: celery -A rewardq.workers.main",
    "rewardq.flower": "the Flower process's app module: celery -A rewardq.flower:app",
    "rewardq.screenshot_flower": "a script run by hand",
    # Library code below: reported in issue 10 (settings should be passed in).
    "rewardq.producer.client": "RewardClient.from_env()",
    "rewardq.integrations.verl_batch": "Settings() when verl <= 0.6 constructs it without settings",
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
    assert reads["rewardq.workers.main"], "the scan finds the worker's Settings()"
    unexpected = [read for module, found in sorted(reads.items())
                  if module not in ENVIRONMENT_READERS for read in found]
    assert not unexpected, "\n".join(unexpected)
    stale = sorted(module for module in ENVIRONMENT_READERS if not reads[module])
    assert not stale, f"no longer read the environment, remove: {stale}"
