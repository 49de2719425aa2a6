"""Per-row operations on a logits tile: the interface (:class:`RowOps`) and one implementation per backend.

The engine's passes (:mod:`dpo_fast.engine.passes`) run the GEMMs with torch (cuBLAS / CPU BLAS) and hand
each logits tile to a backend's row operations, declared by :class:`RowOps`. Results are named records:
:class:`RowResult` (log-probs, lse, optional :class:`TokenStats`).

``TorchRows`` is the CPU path users get (and the CUDA fallback); ``TritonRows`` launches the kernels in
:mod:`dpo_fast.kernels.logprob`. Both apply ``temperature`` and ``softcap`` identically:
zc = softcap * tanh(z / softcap) / temperature (without a cap: z / temperature) — the model's cap first, then
the sampling temperature, the order of samplers (HF generate, vLLM) and TRL.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Protocol

import torch


class TokenStats(NamedTuple):
    """Per-token statistics of a stats-enabled row pass; each (n,) in the accumulation dtype.

    entropy: entropy of the row's softmax.  hit: 1.0 where the label's logit is the row maximum, else 0.0.
    zmean: vocabulary mean of the tempered/capped logits.  lse2: logsumexp(2 zc) (WPO's weights).
    """

    entropy: torch.Tensor
    hit: torch.Tensor
    zmean: torch.Tensor
    lse2: torch.Tensor


#: the names of :class:`TokenStats`' fields, in order
STAT_KEYS = TokenStats._fields


class RowResult(NamedTuple):
    """Output of a row forward over n rows.

    logp: (n,) log-prob of each row's label, zc[y] - lse.  lse: (n,) logsumexp of the tempered/capped row.
    Both in the accumulation dtype (:func:`acc_dtype`, float32 for 16/32-bit tiles).
    stats: :class:`TokenStats` when requested, else None.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    stats: TokenStats | None = None


class RowOps(Protocol):
    """What a backend does with one logits tile. Tiles are (n, Vs) with unit column stride, any row stride.

    Attributes:
        name: "torch" or "triton".
        temperature, softcap: the logit transform, zc = softcap * tanh(z / softcap) / T (or z / T).
        bytes_per_elem: workspace bytes per tile element that the ops need beyond the tile itself
            (the engine sizes tiles with :func:`dpo_fast.engine.tiles.per_elem_bytes`).
    """

    name: str
    temperature: float
    softcap: float | None
    bytes_per_elem: int

    def fwd(self, z: torch.Tensor, labels: torch.Tensor, *, scratch: bool = True,
            stats: bool = False) -> RowResult:
        """Log-probs of a full-vocabulary tile.

        Args:
            z: (n, V) raw logits (h W^T + b), float16/bfloat16/float32 (float64: torch only).
            labels: (n,) int64 in [0, V).
            scratch: ``z`` may be overwritten (the engine's own tiles); False leaves it untouched.
            stats: also compute :class:`TokenStats`.
        """
        ...

    def bwd(self, z: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
            g: torch.Tensor, v_offset: int, g_ent: torch.Tensor | None = None,
            ent: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient of sum_t (g_t log p_t + g_ent_t H_t) w.r.t. the raw logits of a vocabulary-slice tile.

        dz_v = [g (onehot_v - p_v) - g_ent p_v (zc_v - lse + H)] dzc/dz, since zc_v - sum_u p_u zc_u =
        (zc_v - lse) + H: the entropy term needs only the row's saved lse and entropy H.

        Args:
            z: (n, Vs) raw logits of columns [v_offset, v_offset + Vs), a scratch tile (may be overwritten).
            out: (n, Vs) destination, ``z`` itself or another tile (e.g. 16-bit for a float32 ``z``).
            labels: (n,) int64 in [0, V) (labels outside the slice get no one-hot term).
            lse: (n,) the rows' full-vocabulary logsumexp from :meth:`fwd`. g: (n,) upstream gradient.
            g_ent, ent: (n,) upstream gradient of each row's entropy and the entropy itself (the forward's
            stats), both or neither. All in the accumulation dtype.
        Returns:
            ``out``, in its dtype.
        """
        ...

    def fwd_for_grad(self, z: torch.Tensor, labels: torch.Tensor, *,
                     stats: bool = False) -> tuple[RowResult, Any]:
        """Forward of a full-vocabulary tile that keeps what :meth:`grad_after_fwd` needs.

        Returns (result, state): ``state`` is opaque (None when nothing is kept); ``z`` may be overwritten.
        """
        ...

    def grad_after_fwd(self, z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                       state: Any, g_ent: torch.Tensor | None = None,
                       ent: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient of the raw logits of the tile given to :meth:`fwd_for_grad`, written into ``z``; returns z.
        ``g_ent`` / ``ent``: the entropy term as in :meth:`bwd` (``fwd_for_grad`` ran with ``stats``)."""
        ...

    def tempered(self, z: torch.Tensor, *, in_place: bool) -> torch.Tensor:
        """The tile's transformed logits zc (softcap, then temperature) in the accumulation dtype: ``z`` itself
        when ``in_place`` and it is already in that dtype, else a copy. For passes that reduce tiles
        themselves (the vocabulary-parallel head's partial sums)."""
        ...


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/output dtype: float32, or float64 for float64 inputs (gradcheck and references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tempered(z: torch.Tensor, temperature: float, softcap: float | None, in_place: bool) -> torch.Tensor:
    """Accumulation-dtype tile with softcap then temperature applied: ``z`` itself when allowed, else a copy."""
    zc = z if (in_place and z.dtype == acc_dtype(z.dtype)) else z.to(acc_dtype(z.dtype), copy=True)
    if softcap is not None:  # the model's cap first, then the sampling temperature
        zc.mul_(1.0 / softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        zc.mul_(1.0 / temperature)
    return zc


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
        #: extra bytes per tile element of a backward with the entropy term (one accumulation-dtype temporary)
        self.entropy_bytes_per_elem = 4

    def tempered(self, z: torch.Tensor, *, in_place: bool) -> torch.Tensor:
        """See :meth:`RowOps.tempered`."""
        return tempered(z, self.temperature, self.softcap, in_place)

    @staticmethod
    def _exp_rows_(zc: torch.Tensor, labels: torch.Tensor):
        """In place zc -> exp(zc - m) (3 passes). Returns (label logits, lse, row sums s), each (n,)."""
        zy = zc.gather(1, labels[:, None]).squeeze(1)  # read before zc is overwritten
        m = zc.amax(dim=1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # no inf - inf = nan
        s = zc.sub_(m[:, None]).exp_().sum(dim=1)
        return zy, m + torch.log(s), s

    def fwd(self, z: torch.Tensor, labels: torch.Tensor, *, scratch: bool = True, stats: bool = False) -> RowResult:
        """See :meth:`RowOps.fwd`."""
        zc = self.tempered(z, in_place=scratch)  # (n, V)
        if stats:
            zy = zc.gather(1, labels[:, None]).squeeze(1)
            m_raw = zc.amax(dim=1)
            m = torch.where(torch.isfinite(m_raw), m_raw, torch.zeros_like(m_raw))
            e = torch.exp(zc - m[:, None])  # (n, V); zc is still needed for the entropy and the mean
            s = e.sum(dim=1)
            lse = m + torch.log(s)
            lse2 = 2 * m + torch.log(e.square().sum(dim=1))
            ent = lse - (e * zc).sum(dim=1) / s
            return RowResult(zy - lse, lse, TokenStats(ent, (zy >= m_raw).to(zc.dtype), zc.mean(dim=1), lse2))
        zy, lse, _ = self._exp_rows_(zc, labels)
        return RowResult(zy - lse, lse)

    # -- fused route: forward, then the gradient of the very same full-vocabulary tile ---------------------
    def fwd_for_grad(self, z: torch.Tensor, labels: torch.Tensor, *, stats: bool = False):
        """See :meth:`RowOps.fwd_for_grad`.

        Without softcap, the float32 tile (``z`` itself, or one float32 copy of a 16-bit tile) is turned into
        e = exp(zc - m) in place; the gradient is then one pass, dz = g (onehot - e / s), instead of
        recomputing the softmax (3 passes) from a kept copy of the logits.
        """
        if self.softcap is not None or stats:
            return self.fwd(z, labels, scratch=False, stats=stats), None
        e = self.tempered(z, in_place=True)
        zy, lse, s = self._exp_rows_(e, labels)
        return RowResult(zy - lse, lse), (e, s)

    def grad_after_fwd(self, z, labels, lse, g, state, g_ent=None, ent=None):
        """See :meth:`RowOps.grad_after_fwd`."""
        if state is None:
            return self.bwd(z, z, labels, lse, g, 0, g_ent, ent)
        assert g_ent is None, "the entropy gradient needs fwd_for_grad(..., stats=True)"
        e, s = state
        dz = e.mul_((-g / s)[:, None])  # -g * softmax
        rows = torch.arange(labels.numel(), device=labels.device)
        dz.index_put_((rows, labels), g, accumulate=True)  # + g * onehot
        if self.temperature != 1.0:
            dz.mul_(1.0 / self.temperature)
        if dz.data_ptr() != z.data_ptr():
            z.copy_(dz)
        return z

    def bwd(self, z, out, labels, lse, g, v_offset: int, g_ent=None, ent=None):
        """See :meth:`RowOps.bwd`."""
        n, Vs = z.shape
        # in place on the scratch tile when it is already float32/float64
        zc = self.tempered(z, in_place=True)
        chain = None
        if self.softcap is not None:  # zc = cap tanh(z/cap) / T: dzc/dz = (1 - tanh^2) / T, tanh = zc T / cap
            chain = torch.square(zc * (self.temperature / self.softcap)).neg_().add_(1.0).mul_(1.0 / self.temperature)
        a = zc.sub_(lse[:, None])  # zc - lse
        if g_ent is None:
            # p = softmax(zc) restricted to this slice; dz = g * (onehot - p) * chain
            dz = a.exp_().mul_(-g[:, None])
        else:
            # dz = g onehot - p (g + g_ent (zc - lse + H)): one more tile-sized temporary (ENTROPY_BYTES_PER_ELEM)
            w = (a + ent[:, None]).mul_(g_ent[:, None]).add_(g[:, None])
            dz = a.exp_().mul_(w).neg_()
            del w
        local = labels - v_offset
        # + g at the label when it lies in this slice; other rows add 0 at column 0 (no nonzero: no host sync)
        inside = (local >= 0) & (local < Vs)
        rows = torch.arange(n, device=labels.device)
        dz.index_put_((rows, torch.where(inside, local, 0)), torch.where(inside, g, 0.0).to(dz.dtype),
                      accumulate=True)
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
    entropy_bytes_per_elem = 0

    def __init__(self, temperature: float, softcap: float | None):
        from ..kernels import logprob as _k  # imports triton; deferred so `import dpo_fast` stays light

        self._k = _k
        self.temperature = float(temperature)
        self.softcap = None if softcap is None else float(softcap)

    def fwd(self, z, labels, *, scratch: bool = True, stats: bool = False) -> RowResult:
        """See :meth:`RowOps.fwd`; the kernel never writes ``z``."""
        logp, lse, st = self._k.logprob_fwd(z, labels, self.temperature, self.softcap, stats)
        return RowResult(logp, lse, None if st is None else TokenStats(*st))

    def bwd(self, z, out, labels, lse, g, v_offset: int, g_ent=None, ent=None):
        """See :meth:`RowOps.bwd`."""
        return self._k.logprob_bwd(z, out, labels, lse, g, v_offset, self.temperature, self.softcap, g_ent, ent)

    def fwd_for_grad(self, z, labels, *, stats: bool = False):
        """Fused route: the kernels read the tile without writing it; the gradient pass re-reads it."""
        return self.fwd(z, labels, stats=stats), None

    def grad_after_fwd(self, z, labels, lse, g, state, g_ent=None, ent=None):
        return self.bwd(z, z, labels, lse, g, 0, g_ent, ent)

    def tempered(self, z: torch.Tensor, *, in_place: bool) -> torch.Tensor:
        """See :meth:`RowOps.tempered` (torch ops: the kernels fuse the transform into their own passes)."""
        return tempered(z, self.temperature, self.softcap, in_place)


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


def make_rows(backend: str, device: torch.device, dtype: torch.dtype, temperature: float,
              softcap: float | None) -> RowOps:
    """Row ops for ``backend`` (resolved for ``device``) on tiles of ``dtype``.

    float64 always runs on the torch backend: the Triton kernels take 16/32-bit tiles, and float64 is for
    gradcheck and references.
    """
    be = "torch" if dtype == torch.float64 else resolve_backend(backend, device)
    return TritonRows(temperature, softcap) if be == "triton" else TorchRows(temperature, softcap)
