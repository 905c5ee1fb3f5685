"""The core install is torch alone: ``import slimopt`` and a preset step need nothing else, and a
command whose extra is missing exits with one line naming it."""

from __future__ import annotations

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
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)
        assert not leaked, leaked
        print("ok", len(slimopt.PRESETS))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout


@pytest.mark.parametrize(
    ("command", "extra"),
    [("train", "train"), ("memory", "train"), ("compare", "train,bench"), ("profile", "train")],
)
def test_command_without_its_extra_is_one_line(command, extra):
    proc = _run_hidden(
        f"""
        from slimopt.cli import main
        sys.exit(main([{command!r}]))
        """
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    # torch itself warns once at import when numpy is absent; slimopt adds one line, no traceback
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("slimopt")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"slimopt {command}: this needs ")
    assert lines[0].endswith(f'pip install "slimopt[{extra}]"'), lines[0]


def test_harness_import_without_its_extra_is_one_line():
    proc = _run_hidden(
        """
        from slimopt._extras import MissingExtraError
        try:
            from slimopt.train import models
        except MissingExtraError as exc:
            print(exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        'this needs numpy, transformers, tokenizers, tqdm: pip install "slimopt[train]"'
    )


def test_version_needs_no_extra():
    proc = _run_hidden(
        """
        from slimopt.cli import main
        main(["--version"])
        """
    )
    assert proc.returncode == 0, proc.stderr
    import slimopt

    assert proc.stdout.strip().startswith(f"slimopt {slimopt.__version__} (torch ")


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
