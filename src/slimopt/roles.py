"""Parameter roles: which part of a language model each parameter is.

| role        | what                                                   |
|-------------|--------------------------------------------------------|
| ``embedding`` | an ``nn.Embedding`` table [V, d] (a head tied to it stays ``embedding``) |
| ``lm_head``   | the output projection to the vocabulary [V, d], untied  |
| ``matrix``    | every other parameter with ndim >= 2                    |
| ``vector``    | every parameter with ndim <= 1                          |

Roles come from the module structure, never from a size threshold: an ``nn.Embedding`` is an
embedding; the head is the module returned by ``get_output_embeddings()`` or, failing that, the last
``nn.Linear`` whose ``out_features`` equals the vocabulary size.
"""

from __future__ import annotations

from torch import nn

ROLES: tuple[str, ...] = ("embedding", "lm_head", "matrix", "vector")


class RoleError(ValueError):
    """A parameter whose role cannot be decided."""


def _vocab_size(model: nn.Module) -> int | None:
    get_in = getattr(model, "get_input_embeddings", None)
    if callable(get_in):
        try:
            emb = get_in()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb.num_embeddings
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0].num_embeddings if len(embeddings) == 1 else None


def _head_weight(model: nn.Module) -> nn.Parameter | None:
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        weight = getattr(head, "weight", None)
        if isinstance(weight, nn.Parameter):
            return weight
    vocab = _vocab_size(model)
    if vocab is None:
        return None
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
    return heads[-1].weight if heads else None


def param_roles(model: nn.Module, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Map every parameter name of ``model`` to its role.

    Works on Hugging Face causal LMs, plain ``nn.Module``s, tied heads (the shared weight is listed
    once, as ``embedding``) and PEFT/LoRA models. ``overrides`` maps names to roles for parameters
    the structure cannot decide. A parameter that cannot be classified raises :class:`RoleError`
    naming it; frozen parameters of a non-floating dtype (a quantized base model's integer
    weights) are left out, since no optimizer updates them.

    Example:
        >>> import torch
        >>> from slimopt import param_roles
        >>> model = torch.nn.ModuleDict(
        ...     {"emb": torch.nn.Embedding(100, 8), "proj": torch.nn.Linear(8, 8),
        ...      "head": torch.nn.Linear(8, 100, bias=False)})
        >>> param_roles(model)
        {'emb.weight': 'embedding', 'proj.weight': 'matrix', 'proj.bias': 'vector', 'head.weight': 'lm_head'}
    """
    overrides = dict(overrides or {})
    for name, role in overrides.items():
        if role not in ROLES:
            raise ValueError(f"override for {name!r}: unknown role {role!r}; roles are {ROLES}")

    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = _head_weight(model)
    head_id = id(head) if head is not None else None

    roles: dict[str, str] = {}
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if name in overrides:
            roles[name] = overrides.pop(name)
            continue
        if not p.dtype.is_floating_point:
            if getattr(p, "_slimopt_int8", None) is not None:  # slimopt.quant's int8 codes
                roles[name] = "matrix"
                continue
            if not p.requires_grad:  # frozen integer weights (a quantized base under LoRA)
                continue
            raise RoleError(
                f"cannot classify parameter {name!r}: dtype {p.dtype} is not a real floating type"
            )
        if id(p) in embedding_ids:
            roles[name] = "embedding"
        elif id(p) == head_id:
            if p.ndim != 2:
                raise RoleError(
                    f"cannot classify parameter {name!r}: it is the output head but has shape "
                    f"{tuple(p.shape)} instead of [vocab, hidden]"
                )
            roles[name] = "lm_head"
        elif p.ndim >= 2:
            roles[name] = "matrix"
        else:
            roles[name] = "vector"
    if overrides:
        raise ValueError(f"overrides name parameters the model does not have: {sorted(overrides)}")
    return roles


def norm_dim_of(model: nn.Module) -> dict[str, int]:
    """For each parameter with ndim >= 2, the dim over which SCALE takes its RMS: 1 for a weight laid
    out [out, in] (nn.Linear, LoRA factors: each output row to RMS 1), 0 for an embedding [V, d] and
    for the transposed [in, out] weights of Hugging Face's ``Conv1D`` (GPT-2)."""
    by_id: dict[int, int] = {}
    for module in model.modules():
        transposed = isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D"
        for p in module.parameters(recurse=False):
            if p.ndim >= 2 and (transposed or id(p) not in by_id):
                by_id[id(p)] = 0 if transposed else 1
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


__all__ = ["ROLES", "RoleError", "norm_dim_of", "param_roles"]
