"""The documentation runs: docstring examples of the library and the README's training loop."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

LIBRARY_MODULES = [
    "slimopt",
    "slimopt.optimizer",
    "slimopt.presets",
    "slimopt.roles",
    "slimopt.memory",
]


@pytest.mark.parametrize("name", LIBRARY_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


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
