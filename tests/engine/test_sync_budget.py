"""The host-sync budget of every public call (docs/DESIGN.md, "Host syncs").

Each call may cost at most ONE data-dependent sync — the engine's readback of the per-sequence scored counts
(which size the tiles and the fused groups), with the label-range flag and packed boundaries in the same copy —
plus ONE metrics readback when metrics are asked for. The count must not grow with the number of token
chunks, vocabulary slices or fused groups. Counted on CPU with :class:`support.sync_counter.SyncCounter`,
which flags what would sync on CUDA (see its docstring).

Shapes: a small one with a 1 MiB workspace (many chunks, slices and groups; split-token backward), and the
issue's B 8 x T 1024, H 256, V 8192 with CUDA's default 96 MiB workspace (~30 s on the 2-core machine).
"""

from __future__ import annotations

import pytest
import torch

import dpo_fast
from support.sync_counter import SyncCounter

SMALL = dict(B=8, T=128, H=64, V=2048, workspace=1 << 20)  # 12 forward chunks; backward: 6 token chunks x 2 slices
LARGE = dict(B=8, T=1024, H=256, V=8192, workspace=96 << 20)  # the CUDA default budget: tiling as on CUDA


@pytest.fixture(scope="module", params=[SMALL, LARGE], ids=["small", "B8xT1024xH256xV8192"])
def batch(request):
    cfg = request.param
    g = torch.Generator().manual_seed(0)
    B, T, H, V = cfg["B"], cfg["T"], cfg["H"], cfg["V"]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 4] = -100  # prompt
    labels[1, T - T // 8:] = -100  # padding in one row
    x = dict(cfg, labels=labels,
             hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g) / 16,
             adv=torch.randn(B, generator=g), old=-torch.rand(B, T, generator=g),
             ref_tok=-torch.rand(B, T, generator=g),
             ref=torch.randn(B // 2, generator=g), ref_seq=torch.randn(B, generator=g),
             desirable=torch.tensor([True, False] * (B // 2)))
    dpo_fast.set_workspace_bytes(cfg["workspace"])
    yield x
    dpo_fast.set_workspace_bytes(None)


def leaves(x):
    return x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()


def counted(fn) -> SyncCounter:
    with SyncCounter() as c:
        fn()
    return c


def group_bytes(x, pairs_per_group: int) -> int:
    """A fused workspace that holds ``pairs_per_group`` pairs' logits (each pair 1.5 T scored tokens; fp32 tiles
    on the torch backend: 8 bytes per element)."""
    return int(pairs_per_group * 1.5 * x["T"]) * x["V"] * 8


def test_sequence_logprobs_fwd_bwd(batch):
    h, w = leaves(batch)
    c = counted(lambda: dpo_fast.sequence_logprobs(h, w, batch["labels"], backend="torch").sum().backward())
    assert c.count <= 1, c.summary()
    assert h.grad is not None and w.grad is not None


def test_sequence_logprobs_average_fwd_bwd(batch):
    h, w = leaves(batch)
    c = counted(lambda: dpo_fast.sequence_logprobs(h, w, batch["labels"], average=True,
                                                   backend="torch").sum().backward())
    assert c.count <= 1, c.summary()


def test_no_grad_forward(batch):
    with torch.no_grad():
        c = counted(lambda: dpo_fast.sequence_logprobs(batch["hidden"], batch["weight"], batch["labels"],
                                                       backend="torch"))
    assert c.count <= 1, c.summary()


def test_token_logprobs_fwd_bwd(batch):
    h, w = leaves(batch)
    c = counted(lambda: dpo_fast.token_logprobs(h, w, batch["labels"], backend="torch").sum().backward())
    assert c.count <= 1, c.summary()


def test_packed_sequence_logprobs(batch):
    """Packed input: the cu_seqlens boundaries come back in the same readback and are validated there."""
    if batch["T"] > 128:
        pytest.skip("packed layout: the small shape is enough (same code path)")
    B, T, H = batch["B"], batch["T"], batch["H"]
    h = batch["hidden"].reshape(B * T, H).clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    cu = torch.tensor([0, 100, 300, 301, 700, B * T])
    c = counted(lambda: dpo_fast.sequence_logprobs(h, w, batch["labels"].reshape(-1), cu_seqlens=cu,
                                                   backend="torch").sum().backward())
    assert c.count <= 1, c.summary()


@pytest.mark.parametrize("metrics", [False, True])
@pytest.mark.parametrize("pairs_per_group", [1, 2])
def test_fused_dpo(batch, metrics, pairs_per_group):
    h, w = leaves(batch)
    f = dpo_fast.DPOLoss(beta=0.1, backend="torch", compute_metrics=metrics,
                         workspace_bytes=group_bytes(batch, pairs_per_group))
    routes = []

    def step():
        out = f(h, w, batch["labels"], batch["ref"], batch["ref"] - 1)
        out.loss.backward()
        routes.append(out.route)

    c = counted(step)
    assert routes == ["fused"]
    assert c.count <= 1 + metrics, c.summary()


def test_fused_dpo_reference_from_hidden(batch):
    h, w = leaves(batch)
    f = dpo_fast.DPOLoss(beta=0.1, backend="torch", compute_metrics=False, workspace_bytes=group_bytes(batch, 1))
    c = counted(lambda: f(h, w, batch["labels"], ref_hidden=batch["hidden"] * 0.5).loss.backward())
    assert c.count <= 1, c.summary()


@pytest.mark.parametrize("cls", [dpo_fast.CPOLoss, dpo_fast.ORPOLoss], ids=["CPOLoss", "ORPOLoss"])
def test_fused_reference_free(batch, cls):
    h, w = leaves(batch)
    f = cls(backend="torch", workspace_bytes=group_bytes(batch, 1))
    routes = []

    def step():
        out = f(h, w, batch["labels"])
        out.loss.backward()
        routes.append(out.route)

    c = counted(step)
    assert routes == ["fused"]
    assert c.count <= 2, c.summary()


def test_fused_kto(batch):
    h, w = leaves(batch)
    f = dpo_fast.KTOLoss(backend="torch", workspace_bytes=group_bytes(batch, 1))
    routes = []

    def step():
        out = f(h, w, batch["labels"], batch["desirable"], batch["ref_seq"], kl=0.1)
        out.loss.backward()
        routes.append(out.route)

    c = counted(step)
    assert routes == ["fused"]
    assert c.count <= 2, c.summary()


@pytest.mark.parametrize("metrics", [False, True])
def test_fused_grpo(batch, metrics):
    h, w = leaves(batch)
    f = dpo_fast.GRPOLoss(beta=0.04, backend="torch", compute_metrics=metrics,
                          workspace_bytes=group_bytes(batch, 1))
    routes = []

    def step():
        out = f(h, w, batch["labels"], batch["adv"], old_logps=batch["old"], ref_logps=batch["ref_tok"])
        out.loss.backward()
        routes.append(out.route)

    c = counted(step)
    assert routes == ["fused"]
    assert c.count <= 1 + metrics, c.summary()


def test_bad_labels_still_raise_a_clear_error():
    """The range check is folded into the readback; a bad label is still a ValueError naming it."""
    h, w = torch.randn(2, 8, 4), torch.randn(16, 4)
    labels = torch.full((2, 8), 3)
    labels[1, 5] = 16
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 16\).*found 16"):
        dpo_fast.sequence_logprobs(h, w, labels)
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing"):
        dpo_fast.sequence_logprobs(h[0], w, labels[0], cu_seqlens=torch.tensor([0, 5, 3, 8]))


def test_counter_sees_syncs():
    """The counter itself: what syncs on CUDA is counted, host-only work is not."""
    x = torch.randn(100)
    with SyncCounter() as c:
        torch.nonzero(x > 0)  # 1
        float(x.sum())  # 1 (_local_scalar_dense)
        x.tolist()  # 1
        torch.bincount((x > 0).long())  # 2
        y = torch.arange(5)  # host
        y.tolist()  # free: host data
        y.to(x.device)  # 1: host to device
        x.to(torch.float64)  # free: no device change
    assert c.count == 6, c.summary()
