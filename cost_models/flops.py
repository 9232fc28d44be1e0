"""Per-op forward/backward FLOPs and bytes moved of traced fx nodes, from their tensor shapes.

[Note: FLOP conventions]
* Shapes come from ``node.meta["asteroid.tensor_meta"]`` (written by ``asteroid_fx.trace``;
  torch's ``ShapeProp`` key ``"tensor_meta"`` is accepted too). They are the shapes at the
  example batch, so every per-sample figure is the whole-batch figure divided by that batch.
* One multiply-add is 2 FLOPs. Contractions count only their multiply-adds; the bias add
  is left out (it is one FLOP per output element, noise next to the contraction), so
  ``nn.Linear(i, o)`` costs exactly ``2 i o`` FLOPs per sample (per position for
  sequences) and ``nn.Conv2d`` costs ``2 (Cin/groups) Kh Kw Cout Hout Wout``.
* Elementwise ops cost a fixed number of FLOPs per output element (``_ELEMENTWISE``:
  1 for add/mul/relu, 4 for sigmoid/tanh/silu, 8 for gelu, 5 for softmax and for
  normalisation layers, which compute statistics, normalise and apply the affine map).
* Pooling costs ``prod(kernel)`` per output element; adaptive pooling and reductions cost
  one FLOP per input element. View, shape and indexing ops cost nothing and move nothing;
  copies (``cat``, ``contiguous``, ``pad`` ...) move bytes but cost no FLOPs.
* ``nn.MultiheadAttention`` (always a leaf) counts the q/k/v and output projections,
  ``Q K^T``, the softmax and ``A V``.
* An unknown leaf module costs ``2 * parameters`` per sample plus one FLOP per output
  element (a guess, logged at debug level); an unknown function one FLOP per output
  element.
* Backward FLOPs are 2x forward for contractions and for ops with trainable weights (the
  input gradient plus the weight gradient, each as expensive as the forward), and 1x for
  everything else (one pass over the output gradient).
* Bytes moved (per sample) are the activation bytes read (tensor arguments other than
  parameters) plus the output bytes written. Weights are read once per call, independent
  of the batch, and are reported separately in ``weight_bytes``.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["NodeCost", "TensorShape", "node_cost", "nodes_cost", "tensor_shapes", "META_KEY"]

logger = logging.getLogger(__name__)

META_KEY = "asteroid.tensor_meta"


@dataclass(frozen=True)
class TensorShape:
    """Shape and element size of one tensor value of a node."""

    shape: tuple[int, ...]
    itemsize: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class NodeCost:
    """Costs of one node (or of a group of nodes, by ``+``).

    ``fwd_flops``, ``bwd_flops`` and ``bytes_moved`` are per sample; ``weight_bytes`` is
    per call (parameters and buffers read, whatever the batch); ``ops`` is the number of
    nodes that do work (each one kernel launch or more). ``norm_fwd_flops`` and
    ``norm_bwd_flops`` are the parts of ``fwd_flops`` / ``bwd_flops`` spent in batch
    normalisation in training mode, which CPUs run far below their matmul rate (see
    :mod:`cost_models.analytic`).
    """

    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    bytes_moved: float = 0.0
    weight_bytes: float = 0.0
    ops: int = 0
    norm_fwd_flops: float = 0.0
    norm_bwd_flops: float = 0.0

    def __add__(self, other: NodeCost) -> NodeCost:
        return NodeCost(
            self.fwd_flops + other.fwd_flops,
            self.bwd_flops + other.bwd_flops,
            self.bytes_moved + other.bytes_moved,
            self.weight_bytes + other.weight_bytes,
            self.ops + other.ops,
            self.norm_fwd_flops + other.norm_fwd_flops,
            self.norm_bwd_flops + other.norm_bwd_flops,
        )


# -- reading shapes -----------------------------------------------------------------------


def _flatten_meta(value: Any) -> list[TensorShape]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [TensorShape(tuple(int(d) for d in value.shape), value.element_size())]
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and isinstance(dtype, torch.dtype):
        return [TensorShape(tuple(int(d) for d in shape), dtype.itemsize)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _flatten_meta(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _flatten_meta(v)]
    return []


def tensor_shapes(node: fx.Node, gm: fx.GraphModule | None = None) -> list[TensorShape]:
    """The tensor values a node produces, from its shape metadata (flattened, in order).

    Falls back to the attribute itself for ``get_attr`` nodes without metadata.
    """
    if META_KEY in node.meta:
        return _flatten_meta(node.meta[META_KEY])
    if "tensor_meta" in node.meta:
        return _flatten_meta(node.meta["tensor_meta"])
    if node.op == "get_attr" and gm is not None and isinstance(node.target, str):
        try:
            return _flatten_meta(_fetch_attr(gm, node.target))
        except AttributeError:
            return []
    return []


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _first(node: fx.Node, gm: fx.GraphModule) -> TensorShape | None:
    shapes = tensor_shapes(node, gm)
    return shapes[0] if shapes else None


def _arg(node: fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _arg_shape(node: fx.Node, gm: fx.GraphModule, index: int, name: str) -> TensorShape | None:
    value = _arg(node, index, name)
    return _first(value, gm) if isinstance(value, fx.Node) else None


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _is_weight(node: fx.Node) -> bool:
    return node.op == "get_attr"


# -- op classification --------------------------------------------------------------------

# FLOPs per output element of elementwise ops (keys are normalised op names).
_ELEMENTWISE: dict[str, float] = {
    **dict.fromkeys(
        "add sub rsub mul div truediv floordiv true_divide neg abs pow sqrt rsqrt exp log "
        "reciprocal square relu relu6 hardtanh leaky_relu threshold clamp clip maximum "
        "minimum where masked_fill addcmul addcdiv lerp sign floor ceil round fmod "
        "remainder eq ne lt le gt ge logical_and logical_or logical_not and or xor invert "
        "iadd isub imul itruediv prelu rrelu".split(),
        1.0,
    ),
    **dict.fromkeys("dropout dropout1d dropout2d dropout3d alpha_dropout".split(), 2.0),
    **dict.fromkeys(
        "sigmoid tanh silu hardswish hardsigmoid mish softplus elu selu celu glu "
        "logsigmoid softsign tanhshrink hardshrink softshrink erf".split(),
        4.0,
    ),
    "gelu": 8.0,
    **dict.fromkeys("softmax log_softmax softmin".split(), 5.0),
    **dict.fromkeys(
        "layer_norm batch_norm group_norm instance_norm rms_norm local_response_norm "
        "normalize".split(),
        5.0,
    ),
    **dict.fromkeys("interpolate upsample upsample_nearest upsample_bilinear".split(), 4.0),
}

# Ops that only change metadata (views, shapes, indexing): no FLOPs, no bytes.
_FREE = set(
    "view reshape permute transpose t size dim getattr getitem flatten unflatten unsqueeze "
    "squeeze expand expand_as chunk split unbind narrow select detach view_as reshape_as "
    "numel movedim moveaxis swapaxes swapdims type_as requires_grad_ identity "
    "sym_size contiguous_format stride is_contiguous unsafe_view alias slice "
    "split_with_sizes".split()
)

# Ops that copy data: bytes moved but no FLOPs.
_COPY = set(
    "cat concat concatenate stack hstack vstack contiguous clone repeat tile pad to float "
    "half double bfloat16 long int bool type roll flip gather index_select masked_select "
    "scatter embedding zeros_like ones_like full_like empty_like new_zeros new_ones "
    "new_full new_empty copy repeat_interleave tril triu one_hot".split()
)

# Reductions: one FLOP per input element (two for variance-like ones).
_REDUCTION: dict[str, float] = {
    **dict.fromkeys(
        "sum mean max min amax amin argmax argmin prod cumsum cumprod any all "
        "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d "
        "adaptive_max_pool2d adaptive_max_pool3d".split(),
        1.0,
    ),
    **dict.fromkeys("std var norm std_mean var_mean".split(), 2.0),
    "logsumexp": 3.0,
    **dict.fromkeys(
        "cross_entropy nll_loss mse_loss l1_loss binary_cross_entropy "
        "binary_cross_entropy_with_logits smooth_l1_loss kl_div".split(),
        5.0,
    ),
}

_POOL = set(
    "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d lp_pool1d lp_pool2d "
    "max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices".split()
)

_CONTRACTIONS = set(
    "conv conv1d conv2d conv3d conv_transpose conv_transpose1d conv_transpose2d "
    "conv_transpose3d linear bilinear matmul mm bmm addmm baddbmm addbmm einsum "
    "scaled_dot_product_attention multi_head_attention".split()
)


def _normalise(name: str) -> str:
    name = name.strip("_")
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name


def _function_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, str):
        return _normalise(target)
    if isinstance(target, torch._ops.OpOverload):  # aten.addmm.default -> "addmm"
        return _normalise(str(target.overloadpacket.__name__))
    return _normalise(str(getattr(target, "__name__", target)))


_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.MultiheadAttention, "multi_head_attention"),
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Linear, "linear"),
    (nn.Bilinear, "bilinear"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.modules.instancenorm._InstanceNorm, "instance_norm"),
    (nn.LocalResponseNorm, "local_response_norm"),
    (nn.Embedding, "embedding"),
    (nn.EmbeddingBag, "embedding"),
    (nn.modules.pooling._MaxPoolNd, "max_pool"),
    (nn.modules.pooling._AvgPoolNd, "avg_pool"),
    (nn.modules.pooling._LPPoolNd, "lp_pool"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "adaptive_avg_pool"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "adaptive_max_pool"),
    (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.Identity, "identity"),
    (nn.Flatten, "flatten"),
    (nn.Unflatten, "unflatten"),
    (nn.Upsample, "upsample"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.PReLU, "prelu"),
    (nn.Hardtanh, "hardtanh"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.ELU, "elu"),
    (nn.SELU, "selu"),
    (nn.Softplus, "softplus"),
    (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "log_softmax"),
    (nn.CrossEntropyLoss, "cross_entropy"),
    (nn.MSELoss, "mse_loss"),
)


def _module_kind(module: nn.Module) -> str:
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return "module"


def _kernel_elems(kernel: Any, ndim: int) -> int:
    if isinstance(kernel, int):
        return int(kernel) ** ndim
    if isinstance(kernel, Sequence):
        return math.prod(int(k) for k in kernel)
    return 1


# -- the formulas -------------------------------------------------------------------------


def _sum_numel(shapes: Iterable[TensorShape]) -> int:
    return sum(s.numel for s in shapes)


def _sum_bytes(shapes: Iterable[TensorShape]) -> int:
    return sum(s.nbytes for s in shapes)


def _attention_flops(module: nn.MultiheadAttention, node: fx.Node, gm: fx.GraphModule) -> float:
    q = _arg_shape(node, gm, 0, "query")
    k = _arg_shape(node, gm, 1, "key") or q
    v = _arg_shape(node, gm, 2, "value") or k
    if q is None or k is None or v is None:
        return 0.0
    e = module.embed_dim
    tq = q.numel / q.shape[-1]
    tk = k.numel / k.shape[-1]
    if len(k.shape) == 3:
        lk = k.shape[1] if module.batch_first else k.shape[0]
    else:
        lk = k.shape[0]
    proj = 2.0 * tq * q.shape[-1] * e + 2.0 * tk * k.shape[-1] * e
    proj += 2.0 * tk * v.shape[-1] * e + 2.0 * tq * e * e
    scores = 2.0 * tq * lk * e * 2  # Q K^T and A V over all heads
    softmax = _ELEMENTWISE["softmax"] * module.num_heads * tq * lk
    return proj + scores + softmax


def _einsum_flops(node: fx.Node, gm: fx.GraphModule, out: int) -> float:
    equation = node.args[0] if node.args else None
    operands: list[Any] = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    shapes = [_first(op, gm) if isinstance(op, fx.Node) else None for op in operands]
    if not isinstance(equation, str) or any(s is None for s in shapes) or "..." in equation:
        return 2.0 * max([out] + [s.numel for s in shapes if s is not None])
    known = [s for s in shapes if s is not None]  # all of them: None returned above
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, shape in zip(lhs, known):
        for letter, size in zip(letters, shape.shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
    factor = 2.0 if len(operands) > 1 else 1.0
    return factor * math.prod(sizes.values())


def _function_flops(
    name: str, node: fx.Node, gm: fx.GraphModule, ins: list[TensorShape], out: int
) -> float:
    if name in ("matmul", "mm", "bmm"):
        a = _arg_shape(node, gm, 0, "input")
        return 2.0 * out * (a.shape[-1] if a is not None and a.shape else 1)
    if name in ("addmm", "baddbmm", "addbmm"):
        a = _arg_shape(node, gm, 1, "mat1" if name == "addmm" else "batch1")
        return 2.0 * out * (a.shape[-1] if a is not None and a.shape else 1)
    if name == "linear":
        w = _arg_shape(node, gm, 1, "weight")
        return 2.0 * out * (w.shape[-1] if w is not None and w.shape else 1)
    if name in ("conv1d", "conv2d", "conv3d", "convolution", "conv"):
        w = _arg_shape(node, gm, 1, "weight")
        return 2.0 * out * (math.prod(w.shape[1:]) if w is not None else 1)
    if name.startswith("conv_transpose"):
        w = _arg_shape(node, gm, 1, "weight")
        x = _arg_shape(node, gm, 0, "input")
        if w is None or x is None:
            return 2.0 * out
        return 2.0 * x.numel * math.prod(w.shape[1:])
    if name == "einsum":
        return _einsum_flops(node, gm, out)
    if name == "scaled_dot_product_attention":
        q = _arg_shape(node, gm, 0, "query")
        k = _arg_shape(node, gm, 1, "key")
        v = _arg_shape(node, gm, 2, "value")
        if q is None or k is None or v is None or len(k.shape) < 2:
            return 2.0 * out
        rows = q.numel / q.shape[-1]
        s = k.shape[-2]
        return 2.0 * rows * s * (q.shape[-1] + v.shape[-1]) + _ELEMENTWISE["softmax"] * rows * s
    if name in _POOL:
        kernel = _arg(node, 1, "kernel_size")
        x = _arg_shape(node, gm, 0, "input")
        ndim = max(1, len(x.shape) - 2) if x is not None else 2
        return float(out * _kernel_elems(kernel, ndim))
    if name in _REDUCTION:
        return _REDUCTION[name] * _sum_numel(ins)
    if name in _ELEMENTWISE:
        return _ELEMENTWISE[name] * out
    if name in _COPY or name in _FREE:
        return 0.0
    logger.debug("no FLOP formula for %r; counting one FLOP per output element", name)
    return float(out)


def _module_flops(
    kind: str, module: nn.Module, node: fx.Node, gm: fx.GraphModule, ins: list[TensorShape],
    out: int,
) -> float:
    if kind == "multi_head_attention" and isinstance(module, nn.MultiheadAttention):
        return _attention_flops(module, node, gm)
    if kind == "conv" and isinstance(module, nn.modules.conv._ConvNd):
        return 2.0 * out * math.prod(module.weight.shape[1:])
    if kind == "conv_transpose" and isinstance(module, nn.modules.conv._ConvNd):
        x_numel = ins[0].numel if ins else out
        return 2.0 * x_numel * math.prod(module.weight.shape[1:])
    if kind == "linear" and isinstance(module, nn.Linear):
        return 2.0 * out * module.in_features
    if kind == "bilinear" and isinstance(module, nn.Bilinear):
        return 2.0 * out * module.in1_features * module.in2_features
    if kind in ("max_pool", "avg_pool", "lp_pool"):
        ndim = max(1, len(ins[0].shape) - 2) if ins else 2
        return float(out * _kernel_elems(getattr(module, "kernel_size", 1), ndim))
    if kind in ("adaptive_avg_pool", "adaptive_max_pool"):
        return float(_sum_numel(ins))
    if kind in ("embedding", "identity", "flatten", "unflatten"):
        return 0.0
    if kind in _REDUCTION:
        return _REDUCTION[kind] * _sum_numel(ins)
    if kind in _ELEMENTWISE:
        return _ELEMENTWISE[kind] * out
    n_params = sum(p.numel() for p in module.parameters())
    logger.debug(
        "no FLOP formula for leaf module %s (%s); guessing", node.target, type(module).__name__
    )
    batch = _batch_hint(ins, out)
    return 2.0 * n_params * batch + out


def _batch_hint(ins: list[TensorShape], out: int) -> int:
    shapes = [s for s in ins if s.shape]
    return shapes[0].shape[0] if shapes else 1


def node_cost(node: fx.Node, gm: fx.GraphModule, batch: int) -> NodeCost:
    """Forward/backward FLOPs and bytes per sample of one fx node (see the module note).

    Args:
        node: a node of ``gm.graph`` with shape metadata.
        gm: the graph module (to resolve ``call_module`` and ``get_attr`` targets).
        batch: the batch size of the shapes in the metadata.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        return NodeCost()
    batch = max(1, batch)
    out_shapes = tensor_shapes(node, gm)
    out = _sum_numel(out_shapes)
    args = _input_nodes(node)
    act_shapes = [s for a in args if not _is_weight(a) for s in tensor_shapes(a, gm)]
    weight_bytes = float(sum(_sum_bytes(tensor_shapes(a, gm)) for a in args if _is_weight(a)))
    has_weights = any(_is_weight(a) for a in args)

    training_norm = False
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))  # call_module targets are names
        kind = _module_kind(module)
        training_norm = kind == "batch_norm" and module.training
        flops = _module_flops(kind, module, node, gm, act_shapes, out)
        weight_bytes += float(
            sum(p.numel() * p.element_size() for p in module.parameters())
            + sum(b.numel() * b.element_size() for b in module.buffers())
        )
        has_weights = has_weights or any(p.requires_grad for p in module.parameters())
    elif node.op in ("call_function", "call_method"):
        kind = _function_name(node.target)
        flops = _function_flops(kind, node, gm, act_shapes, out)
        training_norm = kind == "batch_norm" and bool(_arg(node, 5, "training"))
    else:  # pragma: no cover - fx has no other ops
        return NodeCost()

    if kind in _FREE:
        return NodeCost()
    moved = float(_sum_bytes(act_shapes) + _sum_bytes(out_shapes))
    factor = 2.0 if (kind in _CONTRACTIONS or has_weights) else 1.0
    return NodeCost(
        fwd_flops=flops / batch,
        bwd_flops=factor * flops / batch,
        bytes_moved=moved / batch,
        weight_bytes=weight_bytes,
        ops=1,
        norm_fwd_flops=flops / batch if training_norm else 0.0,
        norm_bwd_flops=factor * flops / batch if training_norm else 0.0,
    )


def nodes_cost(gm: fx.GraphModule, node_names: Iterable[str], batch: int) -> NodeCost:
    """The summed :func:`node_cost` of the named nodes of ``gm.graph`` (e.g. one layer)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    total = NodeCost()
    for name in node_names:
        node = by_name.get(name)
        if node is not None:
            total = total + node_cost(node, gm, batch)
    return total
