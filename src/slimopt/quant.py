"""8-bit weights: linear layers kept as int8 codes with per-block scales, updated during backward
with stochastic rounding onto the int8 grid (spec: ``docs/algorithms.md``, "Lean modes",
"8-bit weights").

**Storage.** :func:`quantize_weights` replaces every ``nn.Linear`` of a model except the output
head by an :class:`Int8Linear`: its ``weight`` is an ``int8`` parameter of codes in [-127, 127]
(``requires_grad=False``: autograd never makes a gradient for it) and its ``weight_scale`` an fp32
buffer with one scale per block of ``block`` consecutive elements of a row (the last block of a
row may be shorter). The value of element ``(i, j)`` is ``code[i, j] * scale[i, j // block]``,
an fp32 product. The embedding, the head, the norms and biases stay in the model's dtype (bf16).

**Forward and backward** run through one autograd function (:class:`_Int8Matmul`): the forward
dequantizes the codes to the activations' dtype a block of rows at a time and multiplies; the
backward dequantizes again for the input's gradient, computes the weight's gradient (in the
activations' dtype, as ``nn.Linear`` does) and hands it at once to the optimizer, which applies
the update and frees it. So no full-precision copy of a layer's weight or gradient outlives its
backward. An autograd function rather than a tensor subclass: the codes stay a plain ``int8``
tensor that ``state_dict``, ``torch.save`` and ``torch.distributed.checkpoint`` store as they
are, and a future FSDP2 port shards the codes and scales as ordinary row-sharded tensors (both
are split on dim 0) and gathers them in the module's pre-forward, without subclass hooks.

**The update** (:func:`step_quantized`, called from the backward): the parameter's rule runs in
fp32 on the dequantized weight and the fp32 gradient (its ordinary fp32 tier; its state, O(d)
for SAGE and nothing for SCALE's and SinkGD's matrices, is fp32), and the new value ``x`` is
written back rounded stochastically onto the grid, with the counter-based bits of
:mod:`slimopt.rounding` keyed by the parameter's ``sr_seed`` and its write count ``sr_step`` (both
in the optimizer state, as for bf16 parameters, so a resumed run continues bit for bit):

* ``q = fl32(x / s)`` (the fp32 quotient), ``z = floor(q * 2^16)`` (exact: ``|q| < 2^8``);
* with ``r`` in [0, 2^16) the element's rounding integer (the same bits a bf16 write of the same
  ``(sr_seed, sr_step, index)`` would use), the code is ``(z + r) >> 16`` (floor division): the
  low 16 bits of ``z`` are the fraction ``t`` of a grid step, and the code rounds up exactly when
  ``t + r >= 2^16``, with probability ``t / 2^16``. So ``E[code] = z / 2^16``, which is ``q`` to
  within 2^-16 of a grid step (the same addition-and-carry as the bf16 rounding).

**Scales** never clip a code. At every write, each block's largest ``|q|`` is checked: a block
whose new values need a code beyond ±127 (``max|q| > 127``; at ``max|q| <= 127`` no code can leave
[-127, 127], on either side), or use less than half the range (``max|q| < 63.5``, so a shrinking block does not lose resolution), gets a new
scale ``fl32(max|x| / 127)`` (raised to the next fp32 number until its codes fit) before it is
rounded; every other block keeps its scale. A block of zeros keeps its scale. Codes are checked
against [-127, 127] after rounding; a code outside is an error, never clamped.

**What is slow.** This is the torch reference: the rule's fp32 tier plus a few element-wise
passes per matrix, a block of rows at a time (the rounding bits come from the native Philox loop
through :func:`slimopt.rounding.stochastic_round_`). A fused int8 kernel would read the codes and
write them once.

>>> import torch, slimopt
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> model = quantize_weights(model.to(torch.bfloat16), block=8, keep=())
>>> model[0].weight.dtype, tuple(model[0].weight_scale.shape)
(torch.int8, (16, 1))
>>> opt = slimopt.create_optimizer("scale", model, step_in_backward=True)
>>> before = model[0].weight.clone()
>>> model(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()  # the updates happen here
>>> opt.step()
>>> bool((model[0].weight != before).any()), opt.state[model[0].weight]["sr_step"]
(True, 1)
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from slimopt.rounding import stochastic_round_

__all__ = [
    "BITS",
    "DEFAULT_BLOCK",
    "QMAX",
    "STATE_KEYS",
    "Int8Linear",
    "QuantError",
    "dequantized_state_dict",
    "is_quantized",
    "materialize_",
    "quantize_weights",
    "round_to_grid",
    "scale_bytes",
    "step_quantized",
]

BITS = 8
QMAX = 127  # codes are symmetric: [-127, 127]; -128 is never written
DEFAULT_BLOCK = 256
# the number kept in an int8 weight's optimizer state beside the rounding numbers: its code width
# (it also tells a saved int8 state from a bf16 one: a checkpoint of one cannot load into the other)
STATE_KEYS = ("q_bits",)
# elements of a matrix dequantized, or rounded to the grid, at once (a block of whole rows)
ROW_CHUNK_ELEMENTS = 1 << 22
_FRAC = 1 << 16  # the rounding integers' range: 16 bits of a grid step
_ONE = 0x3F800000  # fp32 bit pattern of 1.0: the carry trick below writes 1.0 + t * 2^-23


class QuantError(ValueError):
    """A model or mode that 8-bit weights cannot hold."""


def is_quantized(p: Any) -> bool:
    """Whether ``p`` is the codes of an :class:`Int8Linear` (a trainable int8 weight).

    >>> is_quantized(torch.nn.Linear(2, 2).weight), is_quantized(Int8Linear(2, 2).weight)
    (False, True)
    """
    return getattr(p, "_slimopt_int8", None) is not None


def state_proxy(p: Tensor, device: torch.device | str | None = None) -> Tensor:
    """What a rule's ``init_state`` is shown for ``p``: ``p`` itself, or for int8 codes an fp32
    tensor of their shape (no memory: an expanded scalar), so their state is fp32."""
    if not is_quantized(p):
        return p
    dev = p.device if device is None else torch.device(device)
    return torch.zeros((), dtype=torch.float32, device=dev).expand(p.shape)


def _n_blocks(in_features: int, block: int) -> int:
    return -(-in_features // block)


def _blocked(t: Tensor, block: int) -> list[tuple[slice, Tensor, slice]]:
    """``t`` (rows x in) as views of shape (rows, blocks, block): the whole blocks, then the short
    last one; each with its column slice and its slice of the scale's blocks."""
    n = t.shape[-1]
    full = n // block
    out = []
    if full:
        out.append((slice(0, full * block), t[:, : full * block].unflatten(1, (full, block)),
                    slice(0, full)))  # fmt: skip
    if n % block:
        out.append((slice(full * block, n), t[:, full * block :].unsqueeze(1),
                    slice(full, full + 1)))  # fmt: skip
    return out


def _scale_for(absmax: Tensor) -> Tensor:
    """``fl32(absmax / 127)``, raised to the next fp32 number where a code would exceed 127."""
    s = absmax / QMAX
    for _ in range(8):
        over = absmax / s > QMAX
        if not bool(over.any()):
            return s
        s = torch.where(over, torch.nextafter(s, torch.full_like(s, math.inf)), s)
    raise QuantError("could not find a scale that holds the block's values in 127 codes")


def _fit_scales(x: Tensor, scale: Tensor, block: int) -> int:
    """Give every block of ``x`` (rows x in, fp32) whose values need a code beyond ±127, or use
    less than half the range, a new scale (in place in ``scale``); returns how many changed."""
    changed = 0
    for _, xb, sb in _blocked(x, block):
        s = scale[:, sb]
        absmax = xb.abs().amax(-1)
        qmax = absmax / s
        need = (qmax > QMAX) | ((qmax < QMAX / 2) & (absmax > 0))
        need |= ~torch.isfinite(qmax) & (absmax > 0)
        if bool(need.any()):
            if not bool(torch.isfinite(absmax).all()):
                raise QuantError("a non-finite value cannot be written to an int8 weight")
            scale[:, sb] = torch.where(need, _scale_for(torch.where(need, absmax, s)), s)
            changed += int(need.sum())
    return changed


def _grid_positions(x: Tensor, scale: Tensor, block: int) -> Tensor:
    """``z = floor(fl32(x / s) * 2^16)`` as int32, one per element of ``x`` (rows x in)."""
    z = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    for cols, xb, sb in _blocked(x, block):
        q = xb / scale[:, sb].unsqueeze(-1)
        z[:, cols] = torch.floor(q.mul_(_FRAC)).flatten(1).to(torch.int32)
    return z


def _carries(t: Tensor, seed: int, step: int, offset: int) -> Tensor:
    """``(t + r) >> 16`` for fractions ``t`` in [0, 2^16) and the rounding integers ``r`` of
    elements ``offset ...`` at ``(seed, step)``: a bf16 stochastic rounding of ``1 + t * 2^-23``
    (whose low 16 bits are ``t``) carries into bit 16 exactly then, so the native Philox loop
    draws the bits (:func:`slimopt.rounding.stochastic_round_`)."""
    src = (t | _ONE).view(torch.float32)
    dst = torch.empty(t.shape, dtype=torch.bfloat16, device=t.device)
    stochastic_round_(dst, src, seed, step, offset)
    return (dst.view(torch.int16) - 0x3F80).to(torch.int8)


def round_to_grid(
    x: Tensor, scale: Tensor, codes: Tensor, *, block: int, seed: int, step: int, offset: int = 0
) -> None:
    """Write ``x`` (fp32, rows x in) into ``codes`` (int8, same shape), rounded stochastically
    onto the grid of ``scale`` (fp32, rows x blocks; blocks that cannot hold their new values are
    given new scales first, in place), with the bits of ``(seed, step)`` for elements ``offset,
    offset + 1, ...`` in row-major order.

    >>> x = torch.full((1, 4096), 0.25 / 127)  # a quarter of a grid step of scale 1/127
    >>> scale, codes = torch.full((1, 1), 1 / 127), torch.empty(1, 4096, dtype=torch.int8)
    >>> x[0, 0] = 1.0  # keeps the block's range
    >>> round_to_grid(x, scale, codes, block=4096, seed=3, step=1)
    >>> sorted(set(codes[0, 1:].tolist())), abs(codes[0, 1:].float().mean().item() - 0.25) < 0.03
    ([0, 1], True)
    """
    if x.dtype != torch.float32 or codes.dtype != torch.int8 or x.shape != codes.shape:
        raise TypeError("round_to_grid writes float32 values into int8 codes of the same shape")
    _fit_scales(x, scale, block)
    z = _grid_positions(x, scale, block)
    carry = _carries(z & (_FRAC - 1), seed, step, offset)
    z >>= 16
    z += carry
    low, high = int(z.min()), int(z.max())
    if low < -QMAX or high > QMAX:  # the scales above make this impossible; never clamp
        raise QuantError(f"a code {low if low < -QMAX else high} outside [-127, 127]")
    codes.copy_(z)


def _row_chunks(rows: int, cols: int) -> Iterable[tuple[int, int]]:
    step = max(1, ROW_CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _dequantize_rows(codes: Tensor, scale: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    for cols, cb, sb in _blocked(codes, block):
        out[:, cols] = (cb.to(torch.float32) * scale[:, sb].unsqueeze(-1)).flatten(1)
    return out if dtype == torch.float32 else out.to(dtype)


class _Int8Matmul(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantized on the fly; the backward steps ``W`` by its optimizer."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, anchor: Tensor, module: Int8Linear) -> Tensor:
        ctx.module = module
        ctx.save_for_backward(x)
        return module.matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        (x,) = ctx.saved_tensors
        module: Int8Linear = ctx.module
        grad_x = module.matmul_t(grad) if ctx.needs_input_grad[0] else None
        g = grad.reshape(-1, grad.shape[-1]).t().to(x.dtype)
        grad_w = g @ x.reshape(-1, x.shape[-1])
        del g
        module.apply_update(grad_w)
        return grad_x, None, None


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 codes with one fp32 scale per ``block`` elements of a
    row (:mod:`slimopt.quant`). ``compute_dtype`` is what the weight is dequantized to for the
    matmul (the activations' dtype when they are floating).

    >>> layer = Int8Linear(4, 3, block=2)
    >>> layer.weight.dtype, tuple(layer.weight_scale.shape), layer(torch.ones(2, 4)).shape
    (torch.int8, (3, 2), torch.Size([2, 3]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        block: int = DEFAULT_BLOCK,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        self.in_features, self.out_features = in_features, out_features
        self.block = min(block, in_features)
        self.compute_dtype = dtype
        codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight._slimopt_int8 = weakref.ref(self)  # type: ignore[attr-defined]
        scales = torch.ones(out_features, _n_blocks(in_features, self.block), device=device)
        self.register_buffer("weight_scale", scales)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )
        # an input that requires grad, so that the backward (and the update) runs even where the
        # layer's input does not
        self._anchor = torch.zeros((), requires_grad=True)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits=8, block={self.block}"
        )

    # ------------------------------------------------------------------ values
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight's values (``code * scale`` in fp32, then cast to ``dtype``).

        >>> layer = Int8Linear(2, 1)
        >>> layer.set_weight(torch.tensor([[0.5, -1.0]]))  # 0.5 is 63.5 steps of 1/127
        >>> layer.weight.tolist(), [round(v, 4) for v in layer.dequantize()[0].tolist()]
        ([[64, -127]], [0.5039, -1.0])
        """
        out = torch.empty(self.weight.shape, dtype=dtype, device=self.weight.device)
        for r0, r1 in _row_chunks(*self.weight.shape):
            out[r0:r1] = _dequantize_rows(
                self.weight[r0:r1], self.weight_scale[r0:r1], self.block, dtype
            )
        return out

    @torch.no_grad()
    def set_weight(self, w: Tensor) -> None:
        """Quantize ``w`` (out x in, any floating dtype) into the codes, rounded to nearest, with
        each block's scale ``fl32(max|w| / 127)`` (1.0 for a block of zeros)."""
        if tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"shape {tuple(w.shape)} into an int8 weight {tuple(self.weight.shape)}"
            )
        for r0, r1 in _row_chunks(*self.weight.shape):
            x = w[r0:r1].to(device=self.weight.device, dtype=torch.float32)
            self._set_rows(r0, r1, x)

    def _set_rows(self, r0: int, r1: int, x: Tensor) -> None:
        for cols, xb, sb in _blocked(x, self.block):
            absmax = xb.abs().amax(-1)
            s = torch.where(absmax > 0, _scale_for(torch.where(absmax > 0, absmax, 1.0)), 1.0)
            self.weight_scale[r0:r1, sb] = s
            q = torch.round(xb / s.unsqueeze(-1)).flatten(1)
            self.weight[r0:r1, cols] = q.to(torch.int8)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Initialize like ``nn.init.normal_(weight, 0, std)`` (drawn a block of rows at a time in
        fp32, then rounded to nearest onto the grid) and a zero bias."""
        for r0, r1 in _row_chunks(*self.weight.shape):
            x = torch.randn(r1 - r0, self.in_features, generator=generator,
                            device=self.weight.device) * std  # fmt: skip
            self._set_rows(r0, r1, x)
        if self.bias is not None:
            self.bias.zero_()

    def _dtype_for(self, x: Tensor) -> torch.dtype:
        return x.dtype if x.is_floating_point() else self.compute_dtype

    def matmul(self, x: Tensor) -> Tensor:
        """``x @ W.T`` with ``W`` dequantized to ``x``'s dtype (not recorded by autograd)."""
        w = self.dequantize(self._dtype_for(x))
        return x @ w.t()

    def matmul_t(self, g: Tensor) -> Tensor:
        """``g @ W`` with ``W`` dequantized to ``g``'s dtype."""
        w = self.dequantize(self._dtype_for(g))
        return g @ w

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            y = _Int8Matmul.apply(x, self._anchor, self)
        else:
            with torch.no_grad():
                y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    # ------------------------------------------------------------------ the update
    def apply_update(self, grad: Tensor) -> None:
        """Step the weight with ``grad`` (out x in) by the optimizer it belongs to (built with
        ``step_in_backward=True``); the gradient is not kept."""
        ref = getattr(self.weight, "_slimopt_optimizer", None)
        opt = ref() if ref is not None else None
        if opt is None:
            raise QuantError(
                "an int8 weight (slimopt.quant.Int8Linear) is updated during backward by the "
                "slimopt optimizer that holds it: build one with step_in_backward=True "
                "(slimopt.create_optimizer(preset, model, step_in_backward=True)) before the "
                "first backward"
            )
        step_quantized(opt, self.weight, grad)

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # fmt: skip  # noqa: ANN001
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != torch.int8:
            raise QuantError(
                f"{prefix}weight: the saved weight is {w.dtype}, this layer holds int8 codes; "
                "load the state into the unquantized model and call "
                "slimopt.quant.quantize_weights(model) after loading"
            )
        if w is not None and prefix + "weight_scale" not in state_dict:
            raise QuantError(f"{prefix}weight: the saved int8 codes have no {prefix}weight_scale")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip


def _head(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            return get_out()
        except (NotImplementedError, AttributeError):
            return None
    return None


def quantize_weights(
    model: nn.Module,
    bits: int = 8,
    block: int = DEFAULT_BLOCK,
    *,
    keep: Iterable[str] | None = None,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` but the output head by an
    :class:`Int8Linear` holding its weight rounded to nearest (a layer at a time, so the peak is
    the model plus one layer); returns ``model``. Works on the meta device (what the planner
    sizes). ``keep``: module names left as they are (default: the output head).

    A model with other weight matrices than ``nn.Linear`` ones (GPT-2's ``Conv1D``, tied heads
    excluded) is refused (:class:`QuantError`, naming the parameter): its layers would silently
    stay in bf16.

    >>> m = quantize_weights(torch.nn.Sequential(torch.nn.Linear(4, 4)), keep=())
    >>> type(m[0]).__name__
    'Int8Linear'
    """
    if bits != BITS:
        raise QuantError(f"bits={bits!r}: only 8-bit weights are built")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise QuantError(f"block must be a positive integer, got {block!r}")
    head = _head(model)
    if keep is None:
        keep = [n for n, m in model.named_modules() if head is not None and m is head]
    keep = set(keep)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = {id(m) for m in model.modules() if isinstance(m, nn.Linear)}
    for mname, module in model.named_modules():
        if id(module) in linears or isinstance(module, Int8Linear) or mname in keep:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim >= 2 and id(p) not in embeddings and p.dtype.is_floating_point:
                raise QuantError(
                    f"int8 weights: parameter {f'{mname}.{pname}'.lstrip('.')!r} "
                    f"({type(module).__name__}, shape {tuple(p.shape)}) is a matrix outside "
                    "nn.Linear; only nn.Linear layers are quantized"
                )
    targets = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in keep
    ]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dtype = lin.weight.dtype if lin.weight.dtype.is_floating_point else torch.bfloat16
        q = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, block=block,
                       device=lin.weight.device, dtype=dtype)  # fmt: skip
        if lin.weight.device.type != "meta":
            q.set_weight(lin.weight.detach())
            if lin.bias is not None:
                q.bias.data.copy_(lin.bias.detach())
        setattr(parent, child, q)
        del lin
    return model


@torch.no_grad()
def materialize_(
    model: nn.Module, device: torch.device | str = "cpu", std: float | None = None
) -> nn.Module:
    """Allocate a meta-device model (quantized by :func:`quantize_weights`) on ``device`` and
    initialize it: the int8 layers by :meth:`Int8Linear.reset_parameters` (a block of rows at a
    time, so the peak is the quantized model), every other module by the model's own
    ``_init_weights`` (transformers) or ``reset_parameters``. Returns ``model``.

    >>> with torch.device("meta"):
    ...     m = quantize_weights(torch.nn.Sequential(torch.nn.Linear(4, 4)), keep=())
    >>> materialize_(m)[0].weight.device.type
    'cpu'
    """
    config = getattr(model, "config", None)
    if std is None:
        std = float(getattr(config, "initializer_range", None) or 0.02)
    model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.weight._slimopt_int8 = weakref.ref(m)  # to_empty made a new parameter
            m.reset_parameters(std)
    init = getattr(model, "_init_weights", None)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            continue
        if callable(init):
            init(m)
        elif hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


def scale_bytes(model: nn.Module) -> int:
    """Bytes of the int8 layers' scales (buffers, so not in the parameter count)."""
    return sum(
        m.weight_scale.numel() * m.weight_scale.element_size()
        for m in model.modules()
        if isinstance(m, Int8Linear)
    )


def dequantized_state_dict(
    model: nn.Module, state: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """``state`` (default: ``model.state_dict()``) with every int8 layer's codes and scales
    replaced by its dequantized weight in the layer's compute dtype (bf16): an ordinary state
    dict of the unquantized model (what ``save_pretrained`` writes).

    >>> m = quantize_weights(torch.nn.Sequential(torch.nn.Linear(4, 4)).bfloat16(), keep=())
    >>> sorted(dequantized_state_dict(m)), dequantized_state_dict(m)["0.weight"].dtype
    (['0.bias', '0.weight'], torch.bfloat16)
    """
    state = dict(model.state_dict() if state is None else state)
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            prefix = f"{name}." if name else ""
            if prefix + "weight" in state:
                state[prefix + "weight"] = m.dequantize(m.compute_dtype)
            state.pop(prefix + "weight_scale", None)
    return state


def attach(optimizer: Any) -> None:
    """Let ``optimizer``'s int8 weights find it from their backward (called by
    :class:`slimopt.SlimOptimizer` when built with ``step_in_backward=True``)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if is_quantized(p):
                p._slimopt_optimizer = weakref.ref(optimizer)


def check_optimizer(optimizer: Any) -> None:
    """Raise :class:`QuantError` for int8 weights in an optimizer that would not update them
    (one built without ``step_in_backward``), before any update."""
    if getattr(optimizer, "step_in_backward", False):
        return
    for group in optimizer.param_groups:
        names = group.get("param_names") or []
        for i, p in enumerate(group["params"]):
            if is_quantized(p) and p.device.type != "meta":
                name = names[i] if i < len(names) else f"param {i}"
                raise QuantError(
                    f"{name!r} is an int8 weight: its update runs during backward; build the "
                    "optimizer with step_in_backward=True"
                )


@torch.no_grad()
def step_quantized(optimizer: Any, p: Tensor, grad: Tensor) -> None:
    """One update of the int8 weight ``p`` (codes of an :class:`Int8Linear`) with ``grad``: the
    rule of ``p``'s param group on the fp32 dequantized weight and fp32 gradient, then the new
    value rounded stochastically onto the grid (:func:`round_to_grid`) with the bits of
    ``(state["sr_seed"], state["sr_step"])``. The spec is this module's docstring."""
    from slimopt.algorithms import get_rule
    from slimopt.optimizer import _Work
    from slimopt.rounding import next_rounding

    module = p._slimopt_int8()
    stepper = optimizer._backward_stepper
    if stepper is not None:
        stepper._check_not_twice(p)
    gi = optimizer._group_map()[id(p)]
    group = optimizer.param_groups[gi]
    rule = get_rule(group["algorithm"])
    state = optimizer.state[p]
    if not state:
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        optimizer._new_state(rule, group, index, p)
    w = module.dequantize(torch.float32)
    g = grad.to(torch.float32)
    del grad
    work = _Work(group, rule)
    work.params, work.grads, work.states = [w], [g], [state]
    optimizer._run([work])
    del g, work
    rounding = next_rounding(state)
    cols = module.in_features
    for r0, r1 in _row_chunks(*p.shape):
        round_to_grid(w[r0:r1], module.weight_scale[r0:r1], p.data[r0:r1], block=module.block,
                      seed=rounding.seed, step=rounding.step, offset=r0 * cols)  # fmt: skip
    if stepper is not None:
        stepper.stepped.add(id(p))
