"""Optimizers users would pick instead of slimopt's, built from their official packages.

``pip install "slimopt[baselines]"`` installs them; ``torch.optim.Muon`` ships with torch (>= 2.9).
Each baseline is one ``torch.optim.Optimizer`` for the whole model, so the training harness, the LR
schedule and ``slimopt compare`` treat it exactly like a preset.

| name        | package          | what it keeps                                       |
|-------------|------------------|-----------------------------------------------------|
| ``adam-mini`` | ``adam-mini``      | Adam's momentum, one second moment per block         |
| ``apollo``    | ``apollo-torch``   | Adam moments in a random rank-r projection (matrices)|
| ``galore``    | ``galore-torch``   | Adam moments in an SVD rank-r projection (matrices)  |
| ``muon``      | torch              | Muon momentum (hidden matrices) + AdamW (the rest)   |
| ``prodigy``   | ``prodigyopt``     | Adam moments + Prodigy's D-adaptation statistics     |

Hyperparameters (the packages' documented settings for small LLaMA pretraining, no weight decay
to match the ``adamw`` preset):

- Adam-mini: lr 1e-3, betas (0.9, 0.999), ``dim``/``n_heads`` from the model config (its README).
- APOLLO: lr 1e-2, rank = hidden/4, random projection, channel-wise scaling, scale 1,
  ``update_proj_gap`` 200 on the matrices; AdamW on everything else (the APOLLO README's LLaMA-60M
  recipe, rank 256 of 1024 scaled to the model).
- GaLore: lr 1e-2, rank = hidden/4, ``update_proj_gap`` 200, scale 0.25 on the matrices; AdamW on
  everything else (GaLore paper, LLaMA-60M: rank 128 of 512).
- Muon: lr 0.02, momentum 0.95, Nesterov, 5 Newton-Schulz steps on the hidden matrices; AdamW
  1e-3 on the embedding, head and vectors (the Muon authors' split).
- Prodigy: lr 1.0 (it estimates the step size itself), ``safeguard_warmup`` and bias correction
  on, as its README advises with a warm-up schedule.

State bytes are counted by :func:`deep_state_bytes`: every tensor reachable from
``optimizer.state``, including those held inside projector objects (GaLore, APOLLO), which
``slimopt.state_bytes`` (top-level tensors only) would miss. For slimopt's own optimizers the two
counts are equal.

>>> import torch
>>> from slimopt.bench.baselines import BASELINES, create_baseline
>>> sorted(BASELINES)
['adam-mini', 'apollo', 'galore', 'muon', 'prodigy']
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
>>> opt = create_baseline("muon", model)  # no extra package needed
>>> type(opt).__name__
'MuonWithAdamW'
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class BaselineUnavailable(RuntimeError):
    """A baseline whose package is not installed (the message says what to install)."""


@dataclass(frozen=True)
class Baseline:
    """One baseline optimizer: how to build it and where its settings come from."""

    name: str
    module: str  # the import name that must be present
    package: str | None  # the PyPI distribution (None: part of torch)
    default_lr: float  # the peak lr of its main group; ``lr=`` scales every group by lr/default
    build: Callable[[nn.Module, float], torch.optim.Optimizer]
    # whether its state survives ``torch.load(weights_only=True)`` (a mid-run checkpoint resumes)
    resumable: bool = True


def _hidden_size(model: nn.Module) -> tuple[int, int, int | None]:
    cfg = getattr(model, "config", None)
    dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    kv = getattr(cfg, "num_key_value_heads", None)
    if dim is None or heads is None:
        raise ValueError(
            "this baseline needs a transformers model whose config has hidden_size and "
            "num_attention_heads"
        )
    return int(dim), int(heads), (int(kv) if kv else None)


def _split_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, everything else) by slimopt's roles: embedding and head are not matrices."""
    from slimopt.roles import param_roles

    roles = param_roles(model)
    matrices, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (matrices if roles[name] == "matrix" else rest).append(p)
    return matrices, rest


def _low_rank_groups(model: nn.Module, lr: float, **projection: Any) -> list[dict[str, Any]]:
    matrices, rest = _split_matrices(model)
    dim, _, _ = _hidden_size(model)
    groups: list[dict[str, Any]] = [
        {"params": rest, "lr": lr},
        {"params": matrices, "lr": lr, "rank": max(1, dim // 4), **projection},
    ]
    return [g for g in groups if g["params"]]


def _build_adam_mini(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    dim, heads, kv = _hidden_size(model)
    return Adam_mini(
        model.named_parameters(),
        lr=lr,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        dim=dim,
        n_heads=heads,
        n_kv_heads=kv,
        verbose=False,
    )


def _build_apollo(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from apollo_torch import APOLLOAdamW

    groups = _low_rank_groups(
        model,
        lr,
        proj="random",
        scale_type="channel",
        scale=1.0,
        update_proj_gap=200,
        proj_type="std",
    )
    return APOLLOAdamW(groups, lr=lr, weight_decay=0.0)


def _build_galore(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    groups = _low_rank_groups(model, lr, update_proj_gap=200, scale=0.25, proj_type="std")
    return GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)


def _build_prodigy(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    params = [p for p in model.parameters() if p.requires_grad]
    return Prodigy(params, lr=lr, weight_decay=0.0, safeguard_warmup=True, use_bias_correction=True)


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the hidden matrices and ``torch.optim.AdamW`` on everything else.

    One optimizer: its ``param_groups`` are the two inner optimizers' groups (tagged ``"muon"``),
    its ``state`` is shared, so LR schedulers, ``state_dict`` and checkpoints see one object.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> opt = MuonWithAdamW([model[0].weight], [model[0].bias, *model[1].parameters()])
    >>> model(torch.randn(3, 4)).sum().backward(); opt.step()
    >>> [g["muon"] for g in opt.param_groups]
    [True, False]
    """

    def __init__(
        self,
        muon_params: list[nn.Parameter],
        adamw_params: list[nn.Parameter],
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
    ):
        inner: list[dict[str, Any]] = []
        if muon_params:
            muon = torch.optim.Muon(
                muon_params, lr=lr, momentum=momentum, weight_decay=weight_decay
            )
            inner += [{**g, "muon": True} for g in muon.param_groups]
        if adamw_params:
            adamw = torch.optim.AdamW(
                adamw_params, lr=adamw_lr, betas=adamw_betas, weight_decay=weight_decay
            )
            inner += [{**g, "muon": False} for g in adamw.param_groups]
        super().__init__(inner, {})
        self._muon = torch.optim.Muon(muon_params or [nn.Parameter(torch.zeros(1, 1))])
        self._adamw = torch.optim.AdamW(adamw_params or [nn.Parameter(torch.zeros(1))])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Point the inner optimizers at this one's current groups and state (load_state_dict
        # replaces both), then let each run its own update.
        for inner, is_muon in ((self._muon, True), (self._adamw, False)):
            groups = [g for g in self.param_groups if g["muon"] == is_muon]
            if groups:
                inner.param_groups = groups
                inner.state = self.state
                inner.step()
        return loss


def _build_muon(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    matrices, rest = _split_matrices(model)
    return MuonWithAdamW(matrices, rest, lr=lr, adamw_lr=1e-3 * lr / 0.02)


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("adam-mini", "adam_mini", "adam-mini", 1e-3, _build_adam_mini),
        Baseline("apollo", "apollo_torch", "apollo-torch", 1e-2, _build_apollo, resumable=False),
        Baseline("galore", "galore_torch", "galore-torch", 1e-2, _build_galore, resumable=False),
        Baseline("muon", "torch", None, 0.02, _build_muon),
        Baseline("prodigy", "prodigyopt", "prodigyopt", 1.0, _build_prodigy),
    )
}


def is_available(name: str) -> bool:
    """Whether the baseline's package can be imported here."""
    b = BASELINES[name]
    if b.name == "muon":
        return hasattr(torch.optim, "Muon")
    return importlib.util.find_spec(b.module) is not None


def check_available(name: str) -> None:
    """Raise :class:`BaselineUnavailable` naming what to install, or ``ValueError`` for no baseline."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; baselines are {', '.join(BASELINES)}")
    if not is_available(name):
        b = BASELINES[name]
        what = (
            f"pip install {b.package}  (or: pip install 'slimopt[baselines]')"
            if b.package
            else "a torch with torch.optim.Muon (>= 2.9)"
        )
        raise BaselineUnavailable(f"baseline {name!r} needs {what}")


def create_baseline(name: str, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """The baseline optimizer ``name`` for ``model`` (``lr`` replaces its main learning rate)."""
    check_available(name)
    b = BASELINES[name]
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    return b.build(model, b.default_lr if lr is None else float(lr))


def deep_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor reachable from ``optimizer.state``.

    Walks dicts, lists, tuples and the attributes of plain objects (GaLore's and APOLLO's projectors
    keep their projection matrices there); a tensor reached twice (a view of the same storage
    counts by its own size, the same object once) is counted once.

    >>> import torch
    >>> layer = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.AdamW(layer.parameters())
    >>> layer(torch.randn(2, 4)).sum().backward(); opt.step()
    >>> import slimopt
    >>> deep_state_bytes(opt) == slimopt.state_bytes(opt) == 128
    True
    """
    seen: set[int] = set()
    total = 0

    def visit(value: Any, depth: int) -> None:
        nonlocal total
        if depth > 8 or id(value) in seen:
            return
        if isinstance(value, Tensor):
            seen.add(id(value))
            t = value.to_local() if callable(getattr(value, "to_local", None)) else value
            total += t.numel() * t.element_size()
        elif isinstance(value, dict):
            seen.add(id(value))
            for v in value.values():
                visit(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            seen.add(id(value))
            for v in value:
                visit(v, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
            seen.add(id(value))
            for v in vars(value).values():
                visit(v, depth + 1)

    for state in optimizer.state.values():
        visit(state, 0)
    return total


__all__ = [
    "BASELINES",
    "Baseline",
    "BaselineUnavailable",
    "MuonWithAdamW",
    "check_available",
    "create_baseline",
    "deep_state_bytes",
    "is_available",
]
