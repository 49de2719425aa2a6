"""Count the host syncs a call would cost on CUDA, while it runs on CPU.

On a CPU run every tensor is on the CPU, so the counter *simulates* an accelerator: the tensors that exist
when the counter starts (the caller's inputs) and every tensor derived from them are "device" tensors;
tensors a factory makes without ``device=`` (``torch.tensor(list)``, ``torch.arange(n)``) or with
``device="cpu"`` (the string), and tensors copied to the host (``.cpu()``, ``.to("cpu")``), are "host"
tensors (tagged), and so is anything computed from host tensors only. Two counters then run together:

- a ``TorchDispatchMode`` for the aten ops that make the host wait for the device on CUDA when they read a
  device tensor: reading a scalar (``_local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``), ops whose
  output size depends on the data (``nonzero``, ``unique*``, ``masked_select``, ``repeat_interleave``
  without ``output_size``, indexing or ``index_put`` with a boolean mask), ``bincount`` (CUDA reads the
  input's min and max to the host: weight 2), ``equal`` and ``is_nonzero``;
- a ``TorchFunctionMode`` for the copies between host and device: ``.item()``, ``.tolist()``, ``.numpy()``,
  ``.cpu()``, ``.to("cpu")`` of a device tensor (device to host), ``.to(device)`` / ``.cuda()`` /
  ``.copy_`` of a host tensor into a device one and ``torch.tensor`` / ``torch.as_tensor`` of host data
  with a ``device=`` (host to device, blocking from pageable memory). A ``.to(device)`` of a device tensor
  is a no-op on CUDA and is not counted.

A call counted by the function mode is not counted again by the dispatch mode beneath it (``.item()`` is
one sync, not two). Each event records the op and the innermost dpo_fast frame, for messages.
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: aten overload packets that force a device-to-host sync on CUDA, and how many each costs
_SYNC_OPS = {
    aten._local_scalar_dense: 1,
    aten.nonzero: 1,
    aten.bincount: 2,  # CUDA: min and max of the input read back to size the output
    aten._unique: 1,
    aten._unique2: 1,
    aten.unique_dim: 1,
    aten.unique_consecutive: 1,
    aten.unique_dim_consecutive: 1,
    aten.masked_select: 1,
    aten.equal: 1,
    aten.is_nonzero: 1,
}

_MASK_DTYPES = (torch.bool, torch.uint8)


def _where() -> str:
    """The innermost stack frame inside dpo_fast (else the innermost outside torch and this module)."""
    frames = traceback.extract_stack()[:-3]
    for f in reversed(frames):
        if "/dpo_fast/" in f.filename:
            return f"{f.filename.split('/dpo_fast/')[-1]}:{f.lineno} {f.name}"
    for f in reversed(frames):
        if "/torch/" not in f.filename and not f.filename.endswith("sync_counter.py"):
            return f"{f.filename}:{f.lineno} {f.name}"
    return "?"


class _State:
    def __init__(self):
        self.events: list[tuple[str, str, int]] = []  # (op, where, weight)
        self.suppress = 0

    def add(self, op: str, weight: int = 1) -> None:
        if not self.suppress:
            self.events.append((op, _where(), weight))


def _has_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in (indices or ()))


class _Dispatch(TorchDispatchMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = _tensors(args, kwargs)
        host = bool(ins) and all(_is_host(t) for t in ins)
        packet = func.overloadpacket
        if host:
            pass  # host data: no device involved
        elif packet in _SYNC_OPS:
            self.state.add(str(packet.__name__), _SYNC_OPS[packet])
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.state.add("repeat_interleave")  # sums the repeats to size the output
        elif packet in (aten.index, aten._unsafe_index) and _has_mask(args[1] if len(args) > 1 else None):
            self.state.add("index[bool mask]")
        elif packet in (aten.index_put, aten.index_put_, aten._index_put_impl_) and \
                _has_mask(args[1] if len(args) > 1 else None):
            self.state.add("index_put[bool mask]")
        out = func(*args, **kwargs)
        if host:
            _tag(out, True)
        return out


_TAG = "_sync_counter_host"


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tag(out, host: bool) -> None:
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _TAG, host)
            except (AttributeError, RuntimeError):
                pass


def _tensors(args, kwargs) -> list:
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


def _target_device(args, kwargs):
    """The device argument of ``Tensor.to`` (a str, torch.device or a tensor to match), or None."""
    dev = kwargs.get("device")
    if dev is None:
        for a in args:
            if isinstance(a, (str, torch.device, torch.Tensor)):
                dev = a
                break
    return dev


def _names_host(dev) -> bool:
    """Whether a device argument names the host: the string "cpu" (or a host tensor to match)."""
    if isinstance(dev, torch.Tensor):
        return _is_host(dev)
    return isinstance(dev, str) and dev.split(":")[0] == "cpu"


_FACTORIES = {torch.tensor, torch.as_tensor, torch.arange, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.randn, torch.rand, torch.randint, torch.linspace, torch.eye, torch.from_numpy}


class _Function(TorchFunctionMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = _tensors(args, kwargs)
        name, out_host = None, None
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu):
            name = None if _is_host(args[0]) else "." + func.__name__ + "()"
            out_host = True
        elif func is torch.Tensor.cuda:
            name = ".cuda()" if _is_host(args[0]) else None
            out_host = False
        elif func is torch.Tensor.to and (dev := _target_device(args[1:], kwargs)) is not None:
            to_host = _names_host(dev)
            if to_host != _is_host(args[0]):
                name = ".to(cpu)" if to_host else ".to(device) of a host tensor"
            out_host = to_host
        elif func is torch.Tensor.copy_ and len(args) > 1 and _is_host(args[1]) != _is_host(args[0]):
            name = ".copy_() across host and device"
        elif func in _FACTORIES:
            dev = kwargs.get("device")
            host_data = not any(not _is_host(t) for t in ins)  # Python data or host tensors only
            out_host = dev is None and (host_data or func is not torch.as_tensor) or _names_host(dev)
            if func in (torch.tensor, torch.as_tensor) and dev is not None and not out_host and host_data:
                name = f"torch.{func.__name__}(..., device=)"
            if dev is None and ins and not host_data:
                out_host = False  # as_tensor(device tensor)
        if name is not None:
            self.state.add(name)
            self.state.suppress += 1
        try:
            out = func(*args, **kwargs)
        finally:
            if name is not None:
                self.state.suppress -= 1
        if out_host is None:
            out_host = bool(ins) and all(_is_host(t) for t in ins)
        _tag(out, out_host)
        return out


class SyncCounter:
    """Context manager counting the host syncs a block would cost on CUDA (see the module docstring).

    ``count`` is the weighted total, ``events`` the (op, where, weight) list, ``summary()`` a readable table.

    Example::

        with SyncCounter() as sc:
            loss = fn(...)
            loss.backward()
        assert sc.count <= 1, sc.summary()
    """

    def __init__(self):
        self._state = _State()
        self._modes = (_Function(self._state), _Dispatch(self._state))

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False

    @property
    def events(self) -> list[tuple[str, str, int]]:
        return list(self._state.events)

    @property
    def count(self) -> int:
        return sum(w for _, _, w in self._state.events)

    def summary(self) -> str:
        c = Counter()
        for op, where, w in self._state.events:
            c[(op, where)] += w
        lines = [f"{self.count} syncs:"] + [f"  {n:3d}  {op:24s} {where}" for (op, where), n in c.most_common()]
        return "\n".join(lines)
