"""The documentation runs: docstring examples of the library and the README's training loop."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "slimopt"


def _library_modules() -> list[str]:
    """Every module of the package, from its files (nothing is imported to list them)."""
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # importing it runs the command line
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


LIBRARY_MODULES = _library_modules()


@pytest.mark.parametrize("name", LIBRARY_MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    """Every docstring example of the library runs (``python -m pytest tests`` runs them all). A
    module that needs an optional package that is not installed (transformers, lightning,
    torchtitan, accelerate, triton, ...) is skipped; a broken import inside slimopt fails."""
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "cache"))  # what examples cache stays here
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        # exc.name: the module that could not be imported; None for an ImportError a module
        # raises itself to say it does not apply (torchtitan_register under torchtitan 0.3)
        if exc.name is None or exc.name.split(".")[0] != "slimopt":
            pytest.skip(f"{name}: {exc}")
        raise
    tests = doctest.DocTestFinder().find(module)
    examples = sum(len(t.examples) for t in tests)
    source = Path(module.__file__).read_text()
    assert (examples > 0) == (">>>" in source), f"{name}: examples that doctest does not find"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_module_is_listed_and_examples_are_found():
    assert {"slimopt", "slimopt.optimizer", "slimopt.train.loop"} <= set(LIBRARY_MODULES)
    assert "slimopt.__main__" not in LIBRARY_MODULES


def test_readme_training_loop_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Use it in any training loop", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert 'create_optimizer("sage-hybrid", model)' in code
    exec(compile(code.replace("range(1000)", "range(3)"), "README.md", "exec"), {})


# what importing a slimopt module needs beyond torch (its pip extra or package)
_SLIMOPT_NEEDS = {
    "slimopt.train": "train",
    "slimopt.bench": "bench",
    "slimopt.integrations.hf": "train",
    "slimopt.integrations.lightning": "lightning",
    "slimopt.integrations.torchtitan": "torchtitan",
}
# extras that include others (pyproject's [project.optional-dependencies])
_INCLUDES = {"bench": {"train"}, "hf": {"train"}, "dev": {"train", "bench", "tensorboard"}}


def _readme_blocks() -> list[tuple[str, str]]:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    parts = readme.split("```")
    return [
        (part.split("\n", 1)[0], part.split("\n", 1)[1])
        for part in parts[1::2]
        if part.split("\n", 1)[0] in ("python", "bash")
    ]


def test_every_readme_example_says_what_it_needs():
    """A new user copies an example into a fresh environment: its first line says what to
    install, and a Python example's imports are all covered by what that line names."""
    import ast
    import re

    from slimopt._extras import EXTRA_OF

    blocks = _readme_blocks()
    assert len(blocks) >= 8
    for lang, code in blocks:
        first = code.split("\n", 1)[0]
        assert first.startswith("# needs: "), (
            f"a README {lang} example without a needs line:\n{code}"
        )
        if lang != "python":
            continue
        extras = {e.strip() for group in re.findall(r"slimopt\[([a-z,]+)\]", first)
                  for e in group.split(",")}  # fmt: skip
        for extra in list(extras):
            extras |= _INCLUDES.get(extra, set())
        packages = set(re.findall(r"\b([a-z][a-z0-9_-]+)\b", first))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                needed = next(
                    (n for m, n in _SLIMOPT_NEEDS.items() if module.startswith(m)),
                    EXTRA_OF.get(top, top if top not in ("torch", "slimopt") else None),
                )
                assert needed is None or needed in extras | packages, (
                    f"README example imports {module}, which needs {needed!r}, not named in "
                    f"{first!r}"
                )
