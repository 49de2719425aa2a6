"""Peak bytes of the tensors a block allocates, measured with a ``TorchDispatchMode`` (works on CPU).

Every tensor an aten op returns inside the block is attributed to its storage; a storage counts from the op
that first returns it until the last tensor seen on it is freed (views of a storage keep it counted). Storages
that existed before the block (the inputs, and views of them) never count. ``peak`` is the largest sum of live
counted storages at any op boundary, which is what an allocator's peak would show for the block's own
tensors (without the caching allocator's rounding and fragmentation, and without an op's internal scratch
that never becomes a tensor, e.g. BLAS workspaces).
"""

from __future__ import annotations

import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...``; then ``m.peak`` (bytes) and ``m.peak_what`` (the op at the peak)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # storage data_ptr -> [nbytes, tensors alive on it]
        self.foreign: set[int] = set()
        self.cur = 0
        self.peak = 0
        self.peak_what = ""

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.cur -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.foreign.add(key)
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or (key in self.foreign and key not in self.live):
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [nbytes, 0]
                self.cur += nbytes
            elif nbytes > entry[0]:  # resized in place (out= of a larger shape)
                self.cur += nbytes - entry[0]
                entry[0] = nbytes
            entry[1] += 1
            weakref.finalize(t, self._drop, key)
        if self.cur > self.peak:
            self.peak, self.peak_what = self.cur, str(func)
        return out
