"""The core install is torch alone: ``import slimopt`` and a preset step need nothing else, and a
command whose extra is missing exits with one line naming it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slimopt._extras import EXTRA_OF, MissingExtraError, check_installed, install_hint, require

ROOT = Path(__file__).resolve().parents[2]

# Hides the optional packages from every import in the child process, as if never installed:
# the path finder answers "not found" for them (so importlib.util.find_spec gives None, as
# torch's own optional-dependency probes expect).
BLOCKER = textwrap.dedent(
    """
    import sys
    from importlib.machinery import PathFinder
    HIDDEN = {"transformers", "tokenizers", "numpy", "matplotlib", "tqdm", "triton", "datasets",
              "accelerate", "lightning", "pytorch_lightning", "torchtitan", "tensorboard", "peft"}

    class HidingPathFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            return PathFinder.find_spec(name, path, target)

        @staticmethod
        def invalidate_caches():
            PathFinder.invalidate_caches()

    sys.meta_path[:] = [HidingPathFinder if f is PathFinder else f for f in sys.meta_path]
    """
)


def _run_hidden(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_core_dependencies_are_torch_only():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch"]
    import slimopt

    assert project["version"] == slimopt.__version__
    extras = project["optional-dependencies"]
    for extra in set(EXTRA_OF.values()):
        assert extra in extras, f"slimopt._extras names extra {extra!r} that pyproject lacks"
    dev = " ".join(extras["dev"])
    for needed in ("train", "bench", "pytest", "ruff", "accelerate", "lightning", "peft"):
        assert needed in dev, f"the dev extra misses {needed}"


def test_import_and_preset_step_without_optional_packages():
    proc = _run_hidden(
        """
        import torch, slimopt
        torch.manual_seed(0)
        for preset in slimopt.PRESETS:
            model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
            opt = slimopt.create_optimizer(preset, model)
            before = [p.detach().clone() for p in model.parameters()]
            model(torch.tensor([[1, 2, 3]])).square().mean().backward()
            opt.step()
            assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), preset
        # the Trainer and Lightning helpers need neither framework to be imported
        import slimopt.integrations.hf, slimopt.integrations.lightning
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)
        assert not leaked, leaked
        print("ok", len(slimopt.PRESETS))
        from slimopt._extras import MissingExtraError
        for module in ("slimopt.train.models", "slimopt.integrations.torchtitan"):
            try:
                __import__(module)
            except MissingExtraError as exc:
                print(exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    import slimopt

    assert proc.stdout.splitlines() == [
        f"ok {len(slimopt.PRESETS)}",
        'this needs numpy, transformers, tokenizers, tqdm: pip install "slimopt[train]"',
        "this needs torchtitan: pip install torchtitan",
    ], proc.stdout


COMMAND_EXTRAS = {"train": "train", "memory": "train", "compare": "train,bench", "profile": "train"}


def test_commands_without_their_extra_are_one_line_and_version_needs_none():
    # one child process for all commands: each runs main() with its stderr captured
    proc = _run_hidden(
        f"""
        import contextlib, io, json
        from slimopt.cli import main
        out = {{}}
        for command in {sorted(COMMAND_EXTRAS)!r} + ["--version"]:
            err, std = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
                try:
                    rc = main([command])
                except SystemExit as exc:
                    rc = exc.code
            out[command] = [rc, err.getvalue(), std.getvalue()]
        print(json.dumps(out))
        """
    )
    assert proc.returncode == 0, proc.stderr
    # torch itself may warn once at import when numpy is absent; slimopt adds no traceback
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for command, extra in COMMAND_EXTRAS.items():
        rc, err, _ = results[command]
        assert rc == 1, (command, err)
        assert "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        line = err.strip()
        assert line.startswith(f"slimopt {command}: this needs "), line
        assert line.endswith(f'pip install "slimopt[{extra}]"'), line
    rc, err, std = results["--version"]
    import slimopt

    assert rc == 0, err
    assert std.strip().startswith(f"slimopt {slimopt.__version__} (torch ")


def test_require_names_the_extra():
    with pytest.raises(MissingExtraError, match=r'pip install "slimopt\[bench\]"'):
        require("no_such_module_xyz", "bench")
    with pytest.raises(MissingExtraError, match=r"this needs no_such_a, no_such_b"):
        check_installed(["json", "no_such_a", "no_such_b"])
    assert require("json").__name__ == "json"
    assert install_hint(["numpy", "matplotlib"]) == (
        'this needs numpy, matplotlib: pip install "slimopt[train,bench]"'
    )
    assert install_hint(["lightning"]) == "this needs lightning: pip install lightning"


def test_require_does_not_hide_a_broken_install(tmp_path, monkeypatch):
    (tmp_path / "half_installed_pkg.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("half_installed_pkg", "train")
    assert not isinstance(info.value, MissingExtraError)


def test_readme_integration_snippets_compile():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it with Hugging Face Trainer", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python")[1:]]
    assert len(blocks) == 3
    for block in blocks:
        compile(block, "README.md", "exec")
    for name in ("optimizer_cls_and_kwargs", "configure_optimizers", "peak_lrs"):
        assert name in section
    import slimopt.integrations.hf as hf
    import slimopt.integrations.lightning as lightning

    assert callable(hf.optimizer_cls_and_kwargs) and callable(lightning.configure_optimizers)
