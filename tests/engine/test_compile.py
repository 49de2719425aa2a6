"""torch.compile: the dpo_fast:: custom ops (opcheck), full graphs without breaks, eager parity, recompiles.

The entry points trace to the custom ops of dpo_fast.engine.ops / dpo_fast.fused.ops while Dynamo compiles
(docs/DESIGN.md, "torch.compile"). "aot_eager" runs AOT autograd with the fake implementations (no codegen);
one test uses inductor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dpo_fast
from dpo_fast.engine import ops
from dpo_fast.fused import ops as fops
from support import TOL, assert_close  # noqa: F401  (the one tolerance table)

F32 = TOL["f32"]


def _close(a, b, tol=F32):
    torch.testing.assert_close(a.detach().double(), b.detach().double(), **tol)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(B=4, T=6, H=16, V=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_(True)
    lab = torch.randint(0, V, (B, T), generator=g)
    lab[:, :2] = -100
    lab[-1] = -100  # a sequence with no scored token
    return h, w, b, lab


# ----------------------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch


def _engine_op_cases(backend):
    h, w, b, lab = _batch(dtype=torch.float32)
    M = h.shape[0] * h.shape[1]
    h2, lab1 = h.detach().reshape(M, -1).requires_grad_(True), lab.reshape(-1)
    fwd = (h2, w, b, lab1, -100, 1.3, 2.0, backend, 1 << 20, "float32")
    _, lse = ops.linear_logprobs_fwd(*fwd)
    g = torch.randn(M)
    bwd = (g, h2.detach(), w.detach(), b.detach(), lab1, lse.detach(), -100, 1.3, 2.0, backend, 1 << 20, "float32",
           True, True, True)
    logits = torch.randn(M, 40, requires_grad=True)
    lfwd = (logits, lab1, -100, 0.7, backend, 1 << 20)
    _, llse = ops.logits_logprobs_fwd(*lfwd)
    lbwd = (g, logits.detach(), lab1, llse.detach(), -100, 0.7, backend, 1 << 20)
    return [(ops.linear_logprobs_fwd, fwd), (ops.linear_logprobs_bwd, bwd),
            (ops.linear_logprobs_fwd, (h2, w, None, lab1, -100, 1.0, None, backend, 1 << 20, "float32")),
            (ops.logits_logprobs_fwd, lfwd), (ops.logits_logprobs_bwd, lbwd)]


def test_opcheck_engine_ops_torch():
    for op, args in _engine_op_cases("torch"):
        torch.library.opcheck(op, args)


def test_opcheck_engine_ops_triton_interpreted():
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path[:0] = [{here!r}, {tests!r}]
        import torch, test_compile
        for op, args in test_compile._engine_op_cases("triton"):
            torch.library.opcheck(op, args)
        print("ok")
    """).format(here=os.path.dirname(os.path.abspath(__file__)),
                tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def test_linear_op_matches_reference():
    h, w, b, lab = _batch(dtype=torch.float64)
    logp, _ = ops.linear_logprobs_fwd(h.reshape(-1, 16), w, b, lab.reshape(-1), -100, 1.3, None, "torch", 1 << 20,
                                      "float64")
    ref = torch.log_softmax((h @ w.T + b) / 1.3, -1).gather(-1, lab.clamp_min(0)[..., None])[..., 0]
    ref = torch.where(lab != -100, ref, 0.0).reshape(-1)
    _close(logp, ref, TOL["f64"])


def test_op_rejects_labels_out_of_range():
    h, w, b, lab = _batch()
    lab[0, 3] = 40
    with pytest.raises(ValueError, match="labels"):
        ops.linear_logprobs_fwd(h.reshape(-1, 16), w, b, lab.reshape(-1), -100, 1.0, None, "torch", 1 << 20,
                                "float32")


def test_cu_seqlens_checked_under_compile():
    """Packed input under fullgraph: cu_seqlens' values are checked when the op runs (no sync while tracing)."""
    cu = torch.tensor([0, 4, 10])
    torch.library.opcheck(torch.ops.dpo_fast.checked_cu_seqlens.default, (cu, 10))
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(10, 8, generator=g), torch.randn(13, 8, generator=g)
    y = torch.randint(0, 13, (10,), generator=g)
    f = torch.compile(lambda h, w, y, cu: dpo_fast.sequence_logprobs(h, w, y, cu_seqlens=cu), fullgraph=True,
                      backend="aot_eager")
    _close(f(h, w, y, cu), dpo_fast.sequence_logprobs(h, w, y, cu_seqlens=cu), F32)
    for bad, match in (([0, 4, 9], "last entry"), ([1, 4, 10], r"cu_seqlens\[0\] == 0"),
                       ([0, 6, 4, 10], "non-decreasing")):
        with pytest.raises(ValueError, match=match):
            f(h, w, y, torch.tensor(bad))


def _fused_cases():
    P, T, H, V = 3, 6, 16, 40
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2 * P, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    lab = torch.randint(0, V, (2 * P, T), generator=g)
    lab[:, :2] = -100
    dpo = dpo_fast.DPOLoss(beta=0.1)
    grpo = dpo_fast.GRPOLoss(beta=0.0)
    adv = torch.randn(2 * P, generator=g)
    return [
        (fops.fused_loss, (dpo._compile_spec, "#0:t,#1:t", h, w, None, lab,
                           [torch.randn(P, generator=g), torch.randn(P, generator=g)], True, True, False)),
        (fops.fused_loss, (grpo._compile_spec, "#0:t", h, w, None, lab, [adv], True, True, False)),
        (fops.fused_loss_bwd, (torch.tensor(0.5), torch.randn(2, 3), torch.randn(4, 3), torch.randn(0))),
    ]


def test_opcheck_fused_ops():
    for op, args in _fused_cases():
        torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------------------
# full graphs, no breaks, eager parity


def _grads(*ts):
    out = [t.grad.clone() for t in ts]
    for t in ts:
        t.grad = None
    return out


def _no_breaks(fn, *args):
    ex = torch._dynamo.explain(fn)(*args)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


@pytest.mark.parametrize("packed", [False, True])
def test_entry_points_fullgraph_match_eager(packed):
    h, w, b, lab = _batch()
    if packed:
        cu = torch.tensor([0, 5, 12, 24], dtype=torch.int32)

        def fn(h, w, b, lab):
            s = dpo_fast.sequence_logprobs(h.reshape(-1, 16), w, lab.reshape(-1), bias=b, cu_seqlens=cu,
                                           temperature=0.9, softcap=3.0, average=True)
            return s.sum() + dpo_fast.token_logprobs(h.reshape(-1, 16), w, lab.reshape(-1), bias=b).square().sum()
    else:
        def fn(h, w, b, lab):
            s = dpo_fast.sequence_logprobs(h, w, lab, bias=b, temperature=0.9, softcap=3.0)
            return s.sum() + dpo_fast.token_logprobs(h, w, lab, bias=b).square().sum()
    _no_breaks(fn, h, w, b, lab)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(h, w, b, lab)
    out.backward()
    got = _grads(h, w, b)
    ref = fn(h, w, b, lab)
    ref.backward()
    _close(out, ref)
    for a, r in zip(got, _grads(h, w, b)):
        _close(a, r)


def test_logprobs_from_logits_fullgraph():
    _, _, _, lab = _batch()
    logits = torch.randn(4, 6, 40, requires_grad=True)

    def fn(x, lab):
        return (dpo_fast.logprobs_from_logits(x, lab, reduction="mean").sum()
                + dpo_fast.logprobs_from_logits(x, lab, reduction="none").square().sum())
    _no_breaks(fn, logits, lab)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(logits, lab)
    out.backward()
    (got,) = _grads(logits)
    ref = fn(logits, lab)
    ref.backward()
    _close(out, ref)
    _close(got, logits.grad)


def _llama():
    from support.models import V, tiny_model
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (4, 10), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :3] = -100
    labels[:, -1] = -100
    return model, ids, labels


def _model_grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("loss", ["dpo", "sequence_logprobs", "grpo"])
def test_tiny_llama_fullgraph_matches_eager(loss):
    pytest.importorskip("transformers")
    model, ids, labels = _llama()
    ref = torch.randn(2, generator=torch.Generator().manual_seed(4)) - 20.0
    dpo = dpo_fast.DPOLoss(beta=0.1)
    grpo = dpo_fast.GRPOLoss(beta=0.0)
    adv = torch.tensor([1.0, -0.5, 0.25, 0.0])

    def step(ids, labels):
        hidden = model.model(input_ids=ids).last_hidden_state
        w = model.lm_head.weight
        if loss == "dpo":
            return dpo(hidden, w, labels, ref[0].expand(2), ref[1].expand(2)).loss
        if loss == "grpo":
            return grpo(hidden, w, labels, adv).loss
        return dpo_fast.sequence_logprobs(hidden, w, labels).mean()

    _no_breaks(step, ids, labels)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(ids, labels)
    out.backward()
    got = _model_grads(model)
    eager = step(ids, labels)
    eager.backward()
    _close(out, eager)
    want = _model_grads(model)
    assert got.keys() == want.keys()
    for k in want:
        _close(got[k], want[k])


def test_inductor_sequence_logprobs():
    pytest.importorskip("transformers")
    model, ids, labels = _llama()

    def step(ids, labels):
        hidden = model.model(input_ids=ids).last_hidden_state
        return dpo_fast.sequence_logprobs(hidden, model.lm_head.weight, labels).mean()

    out = torch.compile(step, backend="inductor", fullgraph=True)(ids, labels)
    out.backward()
    got = _model_grads(model)
    eager = step(ids, labels)
    eager.backward()
    _close(out, eager)
    for k, v in _model_grads(model).items():
        _close(got[k], v)


def test_compiled_fused_record_and_metrics():
    h, w, _, lab = _batch(B=6)
    lab[-1, 3] = 5
    rc, rr = torch.randn(3), torch.randn(3)
    m = dpo_fast.DPOLoss(beta=0.1, token_metrics=True)

    def fn(h, w, lab, rc, rr):
        return m(h, w, lab, rc, rr)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(h, w, lab, rc, rr)
    ref = m(h, w, lab, rc, rr)
    assert out.route == "compiled"
    for f in ("loss", "losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        _close(getattr(out, f), getattr(ref, f))
    assert sorted(out.metrics.keys()) == sorted(ref.metrics)
    for k, v in ref.metrics.items():
        assert out.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for k, v in ref.token_sums.items():
        _close(out.token_sums[k], v)


# ----------------------------------------------------------------------------------------------------------
# dynamic shapes: random lengths do not recompile every step


def test_random_lengths_recompile_at_most_twice():
    """Marking: ``torch.compile(..., dynamic=True)`` (or ``torch._dynamo.mark_dynamic(x, 1)`` on the length dim)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    m = dpo_fast.DPOLoss(beta=0.1)
    w = torch.randn(40, 16, requires_grad=True)

    def fn(h, w, lab, rc, rr):
        return m(h, w, lab, rc, rr).loss + dpo_fast.sequence_logprobs(h, w, lab).sum()
    cfn = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(7)
    for step in range(10):
        T = int(torch.randint(4, 40, (1,), generator=g))
        h = torch.randn(4, T, 16, generator=g, requires_grad=True)
        lab = torch.randint(0, 40, (4, T), generator=g)
        lab[:, : T // 2] = -100
        cfn(h, w, lab, torch.randn(2, generator=g), torch.randn(2, generator=g)).backward()
    assert counter.frame_count <= 2, counter.frame_count


# ----------------------------------------------------------------------------------------------------------
# the TRL trainer with torch_compile=True


def test_fast_dpo_trainer_torch_compile_logs_match_eager(tmp_path):
    pytest.importorskip("trl")
    from trl import DPOConfig

    from dpo_fast.integrations import trl as fast_trl
    from support.trainer_fixtures import assert_same_logs, char_tokenizer, sums_dataset, tiny_llama

    def run(out, compile_):
        model, ref = tiny_llama()
        args = DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True,
                         torch_compile=compile_, torch_compile_backend="aot_eager")
        tr = fast_trl.FastDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=sums_dataset(),
                                     processing_class=char_tokenizer())
        tr.train()
        return [x for x in tr.state.log_history if "loss" in x]

    assert_same_logs(run(tmp_path / "a", False), run(tmp_path / "b", True))


# ----------------------------------------------------------------------------------------------------------
# distributed heads: a graph break that runs eagerly, or a clear error under fullgraph=True


def test_vocab_parallel_head_under_compile_raises(tmp_path):
    script = textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
        rank = int(sys.argv[1]); dist.init_process_group("gloo", rank=rank, world_size=2)
        import dpo_fast
        from dpo_fast.distributed import vocab_parallel
        torch.manual_seed(0)
        w = torch.randn(40, 16)[rank * 20:(rank + 1) * 20].clone().requires_grad_(True)
        head = vocab_parallel(w)
        h = torch.randn(2, 5, 16); lab = torch.randint(0, 40, (2, 5))
        fn = lambda h, lab: dpo_fast.sequence_logprobs(h, head, lab)
        # without fullgraph: Dynamo breaks the graph at the refused call, which then runs eagerly and is right
        ok = torch.allclose(torch.compile(fn, backend="aot_eager")(h, lab), fn(h, lab))
        torch._dynamo.reset()
        try:  # fullgraph: the clear error
            torch.compile(fn, backend="aot_eager", fullgraph=True)(h, lab)
        except Exception as e:
            ok = ok and "not supported inside torch.compile" in str(e)
        else:
            ok = False
        print("RESULT", ok)
        dist.destroy_process_group()
    """)
    f = tmp_path / "worker.py"
    f.write_text(script)
    port = str(29500 + os.getpid() % 1000)
    procs = [subprocess.Popen([sys.executable, str(f), str(r), "2", port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert "RESULT True" in o, o[-2000:] + e[-3000:]
