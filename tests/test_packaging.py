"""The distributions a user installs from: a test-free sdist with README, LICENSE and docs/ (the
README links there), Project-URLs, classifiers and ``py.typed``; the wheel with ``py.typed`` and
the native kernels' C source. Built from a copy of the checkout with setuptools' own backend (no
network, under a second)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("the build backend needs setuptools >= 77 (pyproject's build-system)")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the files a build sees are its tracked ones)")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    tmp = tmp_path_factory.mktemp("dist")
    tree = tmp / "tree"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tree / name)
    code = (
        "import sys; from setuptools import build_meta as b; out = sys.argv[1]; "  # b edits argv
        "s = b.build_sdist(out); w = b.build_wheel(out); print('BUILT', s, w)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "out")], cwd=tree, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (built,) = [line for line in proc.stdout.splitlines() if line.startswith("BUILT ")]
    sdist, wheel = built.split()[1:]
    with tarfile.open(tmp / "out" / sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"{sdist.removesuffix('.tar.gz')}/PKG-INFO").read().decode()
    with zipfile.ZipFile(tmp / "out" / wheel) as whl:
        wheel_names = set(whl.namelist())
    return names, pkg_info, wheel_names


def test_the_sdist_is_test_free_and_holds_the_docs_the_readme_links(dists):
    names, _, _ = dists
    assert not [n for n in names if n.startswith("tests/") or "/test_" in n or "conftest" in n]
    assert {"README.md", "LICENSE", "pyproject.toml", "src/slimopt/py.typed"} <= names
    assert "src/slimopt/kernels/native/slimopt_cpu.c" in names
    docs = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*") if p.is_file()}
    assert docs and docs <= names
    linked = set(re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text()))
    assert linked and linked <= names


def test_the_metadata_has_project_urls_and_classifiers(dists):
    _, pkg_info, _ = dists
    urls = dict(
        line.removeprefix("Project-URL: ").split(", ", 1)
        for line in pkg_info.splitlines()
        if line.startswith("Project-URL: ")
    )
    assert {"Homepage", "Documentation", "Repository", "Issues"} <= set(urls)
    assert all(u.startswith("https://github.com/slimopt/slimopt") for u in urls.values())
    classifiers = {
        line.removeprefix("Classifier: ")
        for line in pkg_info.splitlines()
        if line.startswith("Classifier: ")
    }
    assert {"Typing :: Typed", "Programming Language :: Python :: 3"} <= classifiers
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in classifiers


def test_the_wheel_is_typed_and_carries_the_kernel_source(dists):
    _, _, wheel_names = dists
    assert {"slimopt/py.typed", "slimopt/kernels/native/slimopt_cpu.c"} <= wheel_names
    assert not [n for n in wheel_names if n.startswith("tests/")]
