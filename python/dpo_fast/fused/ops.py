"""The fused loss modules as ``torch.library`` custom ops, so that ``torch.compile`` traces through them.

A fused module's forward plans its groups from the scored-token counts (a host sync) and calls its loss on
each group; none of that can be traced. So while Dynamo traces, :func:`compilable_forward` replaces the
module's forward by one op call whose outputs are shaped from the inputs alone:

    dpo_fast::fused_loss(str spec, str layout, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels,
                         Tensor?[] extra, bool need_dh, bool need_dw, bool need_db) -> Tensor[]
        = [loss (), dhidden (hidden's shape | (0,)), dweight ((V, H) | (0,)), dbias ((V,) | (0,)),
           metrics (64,) float64 (0-padded), token_sums (16,) float64 (0-padded), *record]
    dpo_fast::fused_loss_bwd(Tensor grad, Tensor dhidden, Tensor dweight, Tensor dbias) -> (Tensor, Tensor, Tensor)

``spec`` is the module flattened to a string (its class and constructor arguments, options dataclasses as
their fields: :func:`module_spec`); ``layout`` names the forward's other arguments, in order, with their kind
(``name:t`` a tensor in ``extra``, ``name:n`` None, ``name:f`` / ``name:i`` / ``name:b`` a Python scalar
carried as a 0-d tensor in ``extra``). The real implementation rebuilds the module from ``spec`` (cached),
runs the eager forward — either route, one host sync as in eager — and takes the gradients w.r.t. hidden,
weight and bias there (on the fused route they are made in that forward anyway); ``fused_loss_bwd`` scales
them by the loss's upstream gradient. ``record`` are the output record's per-unit tensors, cast to the
accumulation dtype, named and shaped by the module class's ``op_record`` (its unit kind and fields): P pairs
(``pairs.shape[0]``, else B // 2), S examples, or labels' shape. Metric and token-sum *names* are recorded by the op's real run (:data:`_NAMES`) and read when a
value is looked up (:class:`OpValues`), after the op ran. Only ``loss`` is differentiable on this path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json

import torch

from .. import losses as L
from .._compiled import CompileUnsupported, refuse_distributed
from ..engine import acc_dtype

Tensor = torch.Tensor

MAX_METRICS = 64
MAX_SUMS = 16

#: spec -> {"metrics": [names], "token_sums": [names], "route": str}, filled by the op's real runs
_NAMES: dict[str, dict] = {}


# ----------------------------------------------------------------------------------------------------------
# the module as a string


def _encode(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"__dataclass__": f"{type(v).__module__}:{type(v).__qualname__}",
                "fields": {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}}
    if isinstance(v, (list, tuple)):
        return {"__tuple__": [_encode(x) for x in v]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot flatten {type(v).__name__} into a custom-op argument")


def _decode(v):
    if isinstance(v, dict) and "__dataclass__" in v:
        mod, name = v["__dataclass__"].split(":")
        return getattr(importlib.import_module(mod), name)(**{k: _decode(x) for k, x in v["fields"].items()})
    if isinstance(v, dict) and "__tuple__" in v:
        return tuple(_decode(x) for x in v["__tuple__"])
    return v


def module_spec(module, args, kwargs) -> str | None:
    """The module's class and constructor arguments as one JSON string (None if an argument is not flat)."""
    try:
        return json.dumps({"cls": f"{type(module).__module__}:{type(module).__qualname__}",
                           "args": _encode(tuple(args)), "kwargs": {k: _encode(v) for k, v in kwargs.items()}},
                          sort_keys=True)
    except TypeError:
        return None


@functools.lru_cache(maxsize=64)
def module_from_spec(spec: str):
    d = json.loads(spec)
    mod, name = d["cls"].split(":")
    cls = getattr(importlib.import_module(mod), name)
    return cls(*_decode(d["args"]), **{k: _decode(v) for k, v in d["kwargs"].items()})


# ----------------------------------------------------------------------------------------------------------
# the ops


def _unpack(layout: str, extra):
    args, kwargs = [], {}
    it = iter(extra)
    for entry in layout.split(",") if layout else ():
        name, kind = entry.rsplit(":", 1)
        v = None if kind == "n" else next(it)
        if kind == "f":
            v = float(v)
        elif kind == "i":
            v = int(v)
        elif kind == "b":
            v = bool(v)
        if name.startswith("#"):
            args.append(v)
        else:
            kwargs[name] = v
    return args, kwargs


def _record_shapes(spec: str, layout: str, hidden, labels, extra):
    kind, fields = type(module_from_spec(spec)).op_record
    named = {}
    it = iter(extra)
    for entry in layout.split(",") if layout else ():
        name, k = entry.rsplit(":", 1)
        named[name] = None if k == "n" else next(it)
    if kind == "pairs":
        pairs = named.get("pairs")
        P = pairs.shape[0] if pairs is not None else labels.shape[0] // 2
        return [(f, (P,)) for f in fields]
    if kind == "examples":
        cu = named.get("cu_seqlens")
        S = cu.shape[0] - 1 if cu is not None else labels.shape[0]
        return [(f, (S,) if f != "baseline" else ()) for f in fields]
    return [(f, tuple(labels.shape)) for f in fields]


def _padded(values: list, width: int, like: Tensor, what: str) -> Tensor:
    if len(values) > width:
        raise CompileUnsupported(f"fused loss under torch.compile: more than {width} {what}")
    out = torch.zeros((width,), dtype=torch.float64, device=like.device)
    if values:
        out[: len(values)] = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=like.device).reshape(())
                                          for v in values])
    return out


def _autograd_inside():
    """Autograd back on inside the op's real implementation (the dispatcher excludes it below the op; the
    eager forward differentiates its group losses and, on the two-pass route, the whole loss)."""
    ex = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView,
                torch._C.DispatchKey.AutogradOther, torch._C.DispatchKey.AutogradNestedTensor):
        ex = ex.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), ex)


@torch.library.custom_op("dpo_fast::fused_loss", mutates_args=())
def fused_loss(spec: str, layout: str, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
               extra: list[Tensor | None], need_dh: bool, need_dw: bool, need_db: bool) -> list[Tensor]:
    module = module_from_spec(spec)
    args, kwargs = _unpack(layout, extra)
    need_db = need_db and bias is not None
    with _autograd_inside(), torch.enable_grad():
        h = hidden.detach().requires_grad_(need_dh)
        w = weight.detach().requires_grad_(need_dw)
        b = None if bias is None else bias.detach().requires_grad_(need_db)
        if b is not None:
            kwargs["bias"] = b
        out = type(module).forward.eager(module, h, w, labels, *args, **kwargs)
        leaves = [t for t, need in ((h, need_dh), (w, need_dw), (b, need_db)) if need]
        grads = iter(torch.autograd.grad(out.loss, leaves, allow_unused=True)
                     if leaves and out.loss.requires_grad else [None] * len(leaves))
    dh = next(grads) if need_dh else None
    dw = next(grads) if need_dw else None
    db = next(grads) if need_db else None
    acc = acc_dtype(hidden.dtype)
    empty = hidden.new_empty((0,))
    metrics = dict(out.metrics or {})
    sums = dict(out.token_sums or {})
    _NAMES[spec] = {"metrics": list(metrics), "token_sums": list(sums), "route": out.route}
    record = []
    for name, shape in _record_shapes(spec, layout, hidden, labels, extra):
        t = getattr(out, name)
        record.append(torch.zeros(shape, dtype=acc, device=hidden.device) if t is None
                      else t.detach().to(acc).reshape(shape).clone())
    return [out.loss.detach().to(acc).reshape(()).clone(),
            torch.zeros_like(hidden) if need_dh and dh is None else (empty if dh is None else dh),
            torch.zeros_like(weight) if need_dw and dw is None else (empty if dw is None else dw),
            torch.zeros_like(bias) if need_db and db is None else (empty if db is None else db),
            _padded(list(metrics.values()), MAX_METRICS, hidden, "metrics"),
            _padded(list(sums.values()), MAX_SUMS, hidden, "token sums"), *record]


@fused_loss.register_fake
def _(spec, layout, hidden, weight, bias, labels, extra, need_dh, need_dw, need_db):
    acc = acc_dtype(hidden.dtype)
    empty = hidden.new_empty((0,))
    return [hidden.new_empty((), dtype=acc),
            torch.empty_like(hidden) if need_dh else empty,
            torch.empty_like(weight) if need_dw else empty,
            torch.empty_like(bias) if need_db and bias is not None else empty,
            hidden.new_empty((MAX_METRICS,), dtype=torch.float64),
            hidden.new_empty((MAX_SUMS,), dtype=torch.float64),
            *(hidden.new_empty(shape, dtype=acc) for _, shape in _record_shapes(spec, layout, hidden, labels, extra))]


@torch.library.custom_op("dpo_fast::fused_loss_bwd", mutates_args=())
def fused_loss_bwd(grad: Tensor, dhidden: Tensor, dweight: Tensor, dbias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t * grad.to(t.dtype) for t in (dhidden, dweight, dbias))


@fused_loss_bwd.register_fake
def _(grad, dhidden, dweight, dbias):
    return torch.empty_like(dhidden), torch.empty_like(dweight), torch.empty_like(dbias)


def _setup(ctx, inputs, output):
    need_dh, need_dw, need_db = inputs[7:10]
    ctx.needs = (need_dh, need_dw, need_db and inputs[4] is not None)
    ctx.n_extra = len(inputs[6])
    ctx.save_for_backward(*output[1:4])


def _backward(ctx, grads):
    dh, dw, db = ctx.saved_tensors
    g = grads[0]
    no_extra = [None] * ctx.n_extra
    if g is None or not any(ctx.needs):
        return None, None, None, None, None, None, no_extra, None, None, None
    dh, dw, db = fused_loss_bwd(g, dh, dw, db)
    n_dh, n_dw, n_db = ctx.needs
    return (None, None, dh if n_dh else None, dw if n_dw else None, db if n_db else None, None, no_extra,
            None, None, None)


fused_loss.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------------
# the traced forward


class OpValues:
    """A read-only mapping of the metrics (or token sums) that a compiled fused call returned.

    The values are one (64,) or (16,) float64 tensor; the names are those the op's real run recorded for the
    module's spec, looked up when read (after the compiled call ran). Metrics read as Python floats (one host
    sync, as eager's ``metrics``), token sums as 0-d tensors.
    """

    def __init__(self, spec: str, kind: str, values: Tensor):
        self.spec, self.kind, self.values = spec, kind, values

    def keys(self):
        return list(_NAMES.get(self.spec, {}).get(self.kind, ()))

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def __contains__(self, name):
        return name in self.keys()

    def __getitem__(self, name):
        v = self.values[self.keys().index(name)]
        return float(v) if self.kind == "metrics" else v

    def get(self, name, default=None):
        return self[name] if name in self else default

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def values_list(self):
        return [self[k] for k in self.keys()]

    def __repr__(self):
        return f"OpValues({dict(self.items())!r})"


def compiled_forward(module, args, kwargs):
    """The module's forward while Dynamo traces: one ``dpo_fast::fused_loss`` call, then the output record."""
    spec = getattr(module, "_compile_spec", None)
    if spec is None:
        raise CompileUnsupported(f"{type(module).__name__}: its constructor arguments cannot be flattened into "
                                 "custom-op arguments; call it outside torch.compile")
    hidden, weight, labels, *rest = args
    bias = kwargs.pop("bias", None)
    refuse_distributed(type(module).__name__, hidden, weight, bias, kwargs.get("ref_weight"))
    layout, extra = [], []
    items = [(f"#{i}", v) for i, v in enumerate(rest)] + sorted(kwargs.items())
    for name, v in items:
        if v is None:
            layout.append(name + ":n")
            continue
        if isinstance(v, bool):
            layout.append(name + ":b")
            v = torch.tensor(v)
        elif isinstance(v, int):
            layout.append(name + ":i")
            v = torch.tensor(v, dtype=torch.int64)
        elif isinstance(v, float):
            layout.append(name + ":f")
            v = torch.tensor(v, dtype=torch.float64)
        elif isinstance(v, Tensor):
            layout.append(name + ":t")
        else:
            layout.append(name + ":t")
            v = torch.as_tensor(v, device=hidden.device)
        extra.append(v)
    grad = torch.is_grad_enabled()
    need = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    layout = ",".join(layout)
    res = fused_loss(spec, layout, hidden, weight, bias, labels, extra, *need)
    loss, metrics, sums, record = res[0], res[4], res[5], res[6:]
    from . import records as R  # noqa: PLC0415

    kind, fields = type(module).op_record
    cls = {"pairs": R.FusedDPOOutput, "examples": R.FusedUnpairedOutput, "tokens": R.FusedGRPOOutput}[kind]
    sums_map = OpValues(spec, "token_sums", sums) if getattr(module, "token_metrics", False) else None
    return cls(loss=loss, **dict(zip(fields, record)), metrics=OpValues(spec, "metrics", metrics), route="compiled",
               token_sums=sums_map)
