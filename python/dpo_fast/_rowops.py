"""Per-row operations on a logits tile, one implementation per backend.

The engine (``logprobs.py``) does the GEMMs with torch (cuBLAS / CPU BLAS) and hands each logits tile
to a backend's two row operations:

* ``fwd(z, labels)`` -> (logp, lse): z (n, V) full-vocabulary tile; logp, lse (n,) float32.
* ``bwd(z, out, labels, lse, g, v_offset)`` -> out: gradient of the raw logits of the (n, Vs) tile whose
  columns start at ``v_offset``, written into ``out`` (which may alias z).

``TorchRows`` is the CPU path users get (and the CUDA fallback); ``TritonRows`` launches the kernels in
:mod:`dpo_fast.kernels.logprob`. Both apply ``temperature`` and ``softcap`` identically:
zc = softcap * tanh(z / (temperature * softcap)), or z / temperature without a cap.
"""

from __future__ import annotations

import os

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/output dtype: float32, or float64 for float64 inputs (gradcheck and references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchRows:
    """Chunked PyTorch row ops.

    Tiles handed to these ops are the engine's scratch buffers, so they work in place when the tile is
    already in the accumulation dtype (float32/float64); 16-bit tiles get one float32 copy.
    """

    name = "torch"

    def __init__(self, temperature: float, softcap: float | None):
        self.temperature = float(temperature)
        self.softcap = None if softcap is None else float(softcap)
        #: bytes of temporaries per tile element beyond the tile itself: one float32 copy for 16-bit or
        #: tempered/capped tiles, plus the softcap chain factor in backward
        self.bytes_per_elem = 8 if self.softcap is not None else 4

    def _tempered(self, z: torch.Tensor, in_place: bool) -> torch.Tensor:
        """Accumulation-dtype tile with temperature and softcap applied: ``z`` itself when allowed, else a copy."""
        zc = z if (in_place and z.dtype == acc_dtype(z.dtype)) else z.to(acc_dtype(z.dtype), copy=True)
        if self.temperature != 1.0:
            zc.mul_(1.0 / self.temperature)
        if self.softcap is not None:
            zc.mul_(1.0 / self.softcap).tanh_().mul_(self.softcap)
        return zc

    @staticmethod
    def _exp_rows_(zc: torch.Tensor, labels: torch.Tensor):
        """In place zc -> exp(zc - m) (3 passes). Returns (label logits, lse, row sums s), each (n,)."""
        zy = zc.gather(1, labels[:, None]).squeeze(1)  # read before zc is overwritten
        m = zc.amax(dim=1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # no inf - inf = nan
        s = zc.sub_(m[:, None]).exp_().sum(dim=1)
        return zy, m + torch.log(s), s

    def fwd(self, z: torch.Tensor, labels: torch.Tensor, scratch: bool = True, stats: bool = False):
        """scratch=True: ``z`` may be overwritten (the engine's tiles); False keeps it.

        Returns (logp, lse), or with ``stats`` (logp, lse, entropy, hit, zmean, lse2), each (n,), where
        lse2 = logsumexp(2 zc) (WPO's weights).
        """
        zc = self._tempered(z, in_place=scratch)  # (n, V)
        if stats:
            zy = zc.gather(1, labels[:, None]).squeeze(1)
            m_raw = zc.amax(dim=1)
            m = torch.where(torch.isfinite(m_raw), m_raw, torch.zeros_like(m_raw))
            e = torch.exp(zc - m[:, None])  # (n, V); zc is still needed for the entropy and the mean
            s = e.sum(dim=1)
            lse = m + torch.log(s)
            lse2 = 2 * m + torch.log(e.square().sum(dim=1))
            ent = lse - (e * zc).sum(dim=1) / s
            return zy - lse, lse, ent, (zy >= m_raw).to(zc.dtype), zc.mean(dim=1), lse2
        zy, lse, _ = self._exp_rows_(zc, labels)
        return zy - lse, lse

    # -- fused route: forward, then the gradient of the very same full-vocabulary tile ---------------------
    def fwd_for_grad(self, z: torch.Tensor, labels: torch.Tensor, stats: bool = False):
        """Forward that leaves what :meth:`grad_after_fwd` needs. Returns (logp, lse, *stats, state).

        Without softcap, the float32 tile (``z`` itself, or one float32 copy of a 16-bit tile) is turned into
        e = exp(zc - m) in place; the gradient is then one pass, dz = g (onehot - e / s), instead of
        recomputing the softmax (3 passes) from a kept copy of the logits.
        """
        if self.softcap is not None or stats:
            return (*self.fwd(z, labels, scratch=False, stats=stats), None)
        e = self._tempered(z, in_place=True)
        zy, lse, s = self._exp_rows_(e, labels)
        return zy - lse, lse, (e, s)

    def grad_after_fwd(self, z, labels, lse, g, state):
        """Gradient of the raw logits of the tile passed to :meth:`fwd_for_grad`, written into ``z``."""
        if state is None:
            return self.bwd(z, z, labels, lse, g, 0)
        e, s = state
        dz = e.mul_((-g / s)[:, None])  # -g * softmax
        rows = torch.arange(labels.numel(), device=labels.device)
        dz.index_put_((rows, labels), g, accumulate=True)  # + g * onehot
        if self.temperature != 1.0:
            dz.mul_(1.0 / self.temperature)
        if dz.data_ptr() != z.data_ptr():
            z.copy_(dz)
        return z

    def bwd(self, z, out, labels, lse, g, v_offset: int):
        n, Vs = z.shape
        # in place on the scratch tile when it is already float32/float64 and is the destination
        zc = self._tempered(z, in_place=out.data_ptr() == z.data_ptr())
        chain = None
        if self.softcap is not None:  # dzc/dz = (1 - (zc/cap)^2) / T
            chain = torch.square(zc * (1.0 / self.softcap)).neg_().add_(1.0).mul_(1.0 / self.temperature)
        # p = softmax(zc) restricted to this slice; dz = g * (onehot - p) * chain
        dz = zc.sub_(lse[:, None]).exp_().mul_(-g[:, None])
        local = labels - v_offset
        rows = torch.nonzero((local >= 0) & (local < Vs)).squeeze(1)
        dz.index_put_((rows, local[rows]), g[rows], accumulate=True)
        if chain is not None:
            dz.mul_(chain)
        elif self.temperature != 1.0:
            dz.mul_(1.0 / self.temperature)
        if dz.data_ptr() != out.data_ptr():
            out.copy_(dz)
        return out


class TritonRows:
    """Triton row kernels; on CPU tensors only under TRITON_INTERPRET=1 (for tests)."""

    name = "triton"
    #: the kernels read the tile and write the gradient in place: no temporaries beyond the tile itself
    bytes_per_elem = 0

    def __init__(self, temperature: float, softcap: float | None):
        from .kernels import logprob as _k  # imports triton; deferred so `import dpo_fast` stays light

        self._k = _k
        self.temperature = float(temperature)
        self.softcap = None if softcap is None else float(softcap)

    def fwd(self, z, labels, scratch: bool = True, stats: bool = False):
        return self._k._logprob_fwd(z, labels, self.temperature, self.softcap, stats)  # never writes z

    def bwd(self, z, out, labels, lse, g, v_offset: int):
        return self._k._logprob_bwd(z, out, labels, lse, g, v_offset, self.temperature, self.softcap)

    def fwd_for_grad(self, z, labels, stats: bool = False):
        """Fused DPO route: the kernels read the tile without writing it; the gradient pass re-reads it."""
        return (*self.fwd(z, labels, stats=stats), None)

    def grad_after_fwd(self, z, labels, lse, g, state):
        return self.bwd(z, z, labels, lse, g, 0)


BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to a concrete one for ``device``, or raise a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not (device.type == "cuda" and _triton_available())):
        return "torch"
    if not (device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); on CPU it runs only under "
            "TRITON_INTERPRET=1 (tests). Use backend='torch' or 'auto'."
        )
    if not _triton_available():
        raise RuntimeError("backend='triton': Triton is not installed (pip install triton)")
    return "triton"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def make_rows(backend: str, device: torch.device, dtype: torch.dtype, temperature: float, softcap: float | None):
    """Row ops for ``backend`` (resolved for ``device``) on tiles of ``dtype``.

    float64 always runs on the torch backend: the Triton kernels take 16/32-bit tiles, and float64 is for
    gradcheck and references.
    """
    be = "torch" if dtype == torch.float64 else resolve_backend(backend, device)
    return TritonRows(temperature, softcap) if be == "triton" else TorchRows(temperature, softcap)
