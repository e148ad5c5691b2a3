"""This checkout's sdist, and its wheel built from that sdist (as ``python -m build`` does).

Built with the test environment's setuptools (no build isolation, nothing downloaded), into
a folder the caller gives; only ``rewardq.egg-info`` is written into the checkout.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Dists:
    """The built files and the unpacked sdist the wheel was built from."""

    sdist: Path
    wheel: Path
    sdist_tree: Path


def _build(kind: str, source: Path, out: Path) -> Path:
    code = f"import setuptools.build_meta as b; print(b.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def build_dists(out: Path) -> Dists:
    """Build the sdist from the checkout, unpack it, and build the wheel from it."""
    out.mkdir(parents=True, exist_ok=True)
    sdist = _build("sdist", ROOT, out)
    with tarfile.open(sdist) as tar:
        tar.extractall(out / "unpacked", filter="data")
    tree = out / "unpacked" / sdist.name.removesuffix(".tar.gz")
    wheel = _build("wheel", tree, out)
    return Dists(sdist, wheel, tree)
