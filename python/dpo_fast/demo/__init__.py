"""``dpo-fast demo``: DPO on a tiny randomly initialised Llama, on CPU in about a minute.

What it does, end to end, with the library's pieces:

1. builds the preference data by a fixed rule (:mod:`dpo_fast.demo.data`: "a+b=" prompts, the correct sum
   is chosen, a wrong sum rejected), tokenized by the demo's own character tokenizer, with held-out prompts;
2. creates a small ``transformers`` Llama with random weights (no download); that initial model is the
   reference, whose log-probs :func:`dpo_fast.reference.precompute_reference_logps` computes once;
3. trains with :class:`dpo_fast.DPOLoss` on batches packed padding-free by the Rust packer
   (:func:`dpo_fast.pack_pairs`), the decoder's hidden states going straight to the fused loss
   (:func:`dpo_fast.hf.call_with_hidden_states`): no logits tensor;
4. prints a progress bar and per-step metrics (TRL names), evaluates on the held-out prompts, and writes a
   PNG of loss / rewards / accuracy over the steps.

Usage: ``dpo-fast demo [--steps N] [--quick] [--plot PATH] [--seed S] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-fast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1200; 40 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (used by the tests)")
    p.add_argument("--batch-pairs", type=int, default=None, help="preference pairs per step (default 64; 32 with --quick)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--max-operand", type=int, default=None, help="operands drawn from 0..N (default 29; 9 with --quick)")
    p.add_argument("--log-every", type=int, default=None, help="print metrics every N steps")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate on held-out prompts every N steps")
    p.add_argument("--plot", default="dpo_fast_demo.png", help="PNG path (default ./dpo_fast_demo.png); '' for none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _build_model(vocab_size: int, quick: bool, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 64 if quick else 96
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device)


def _dpo_step(model, loss_fn, batch, ref_c, ref_r):
    """DPOLoss on a packed batch, computed inside the model's forward from its last hidden states."""
    from dpo_fast.hf import call_with_hidden_states

    def fn(hidden, head):  # hidden (R, L, H): packed rows
        return loss_fn(hidden.reshape(-1, hidden.shape[-1]), head.weight, batch["labels"].reshape(-1), ref_c, ref_r,
                       bias=head.bias, cu_seqlens=batch["cu_seqlens"], pairs=batch["pairs"])

    return call_with_hidden_states(model, fn, batch["input_ids"], position_ids=batch["position_ids"],
                                   cu_seqlens=batch["cu_seqlens"])


def _pack(examples, device, max_tokens=256):
    from dpo_fast import pack_pairs

    b = pack_pairs([e["prompt_ids"] for e in examples], [e["chosen_ids"] for e in examples],
                   [e["rejected_ids"] for e in examples], max_tokens=max_tokens, mode="packed").to_torch(device)
    import torch

    ex = b["example_index"].cpu().tolist()
    ref_c = torch.tensor([examples[i]["ref_chosen_logps"] for i in ex], device=device)
    ref_r = torch.tensor([examples[i]["ref_rejected_logps"] for i in ex], device=device)
    return b, ref_c, ref_r


def run(argv=None, *, out=None) -> dict:
    """Run the demo.

    Returns:
        ``{"history": [per-step metrics], "final": held-out metrics, "train_final": metrics on all training
        pairs, "plot": PNG path or None, "seconds": wall time}``.

    Raises:
        dpo_fast.extras.MissingExtraError: transformers (or, with a plot, matplotlib) is not installed.
        SystemExit: bad arguments, or ``--device cuda`` without a CUDA device (argparse's message, status 2).
    """
    import torch

    from dpo_fast.extras import require

    parser = _parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    # what is missing is said before any work starts, in one line naming the extra to install
    require("transformers", "demo", feature="the demo")
    if args.plot:
        require("matplotlib", "demo", feature="the demo's plot (--plot '' skips it)")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    from tqdm.auto import tqdm

    from dpo_fast import DPOLoss
    from dpo_fast.hf import output_head
    from dpo_fast.reference import precompute_reference_logps

    from .data import CharTokenizer, make_pairs, split_pairs, tokenize

    steps = args.steps if args.steps is not None else (40 if args.quick else 1200)
    args.batch_pairs = args.batch_pairs or (32 if args.quick else 64)
    log_every = args.log_every or (10 if args.quick else 100)
    eval_every = args.eval_every or (20 if args.quick else 100)
    if steps < 1 or args.batch_pairs < 1:
        raise SystemExit("dpo-fast demo: --steps and --batch-pairs must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tok = CharTokenizer()
    max_operand = args.max_operand if args.max_operand is not None else (9 if args.quick else 29)
    train_pairs, eval_pairs = split_pairs(make_pairs(max_operand, seed=args.seed))
    train_ex, eval_ex = tokenize(train_pairs, tok), tokenize(eval_pairs, tok)
    model = _build_model(tok.vocab_size, args.quick, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"dpo-fast demo: {len(train_ex)} training pairs, {len(eval_ex)} held-out (rule: 'a+b=' -> correct sum "
          f"chosen, wrong sum rejected; e.g. {train_pairs[0].prompt!r} {train_pairs[0].chosen!r} > "
          f"{train_pairs[0].rejected!r})", file=out)
    print(f"model: random Llama, {n_params / 1e6:.2f}M parameters, vocab {tok.vocab_size}, on {device}; "
          f"{steps} steps x {args.batch_pairs} pairs, beta {args.beta}, lr {args.lr}", file=out)

    # the reference is the initial model: its log-probs once, with the no-grad fused forward
    train_ex = precompute_reference_logps(model, train_ex, batch_size=256, mode="packed", progress=False)
    eval_ex = precompute_reference_logps(model, eval_ex, batch_size=256, mode="packed", progress=False)
    eval_batch = _pack(eval_ex, device, max_tokens=512)

    loss_fn = DPOLoss(beta=args.beta, **output_head(model).engine_kwargs())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / steps))

    def evaluate(batch, prefix="eval/"):
        model.eval()
        with torch.no_grad():
            o = _dpo_step(model, loss_fn, *batch)
        model.train()
        return {f"{prefix}loss": float(o.loss), **{f"{prefix}{k}": v for k, v in o.metrics.items()}}

    history = []
    model.train()
    bar = tqdm(range(1, steps + 1), desc="DPO", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        batch = _pack(rng.sample(train_ex, min(args.batch_pairs, len(train_ex))), device)
        o = _dpo_step(model, loss_fn, *batch)
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step, "loss": float(o.loss.detach()), **o.metrics}
        if step % eval_every == 0 or step == steps:
            rec.update(evaluate(eval_batch))
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['rewards/accuracies']:.2f}",
                        margin=f"{rec['rewards/margins']:.2f}")
        if step % log_every == 0 or step == 1 or step == steps:
            line = (f"step {step:4d}  loss {rec['loss']:.4f}  rewards/chosen {rec['rewards/chosen']:+.3f}  "
                    f"rewards/rejected {rec['rewards/rejected']:+.3f}  rewards/margins {rec['rewards/margins']:+.3f}  "
                    f"rewards/accuracies {rec['rewards/accuracies']:.2f}")
            if "eval/loss" in rec:
                line += f"  | held-out acc {rec['eval/rewards/accuracies']:.2f} margin {rec['eval/rewards/margins']:+.3f}"
            if args.no_progress:
                print(line, file=out)
            else:
                bar.write(line, file=out)
    bar.close()
    final = {k[5:]: v for k, v in history[-1].items() if k.startswith("eval/")}
    train_final = evaluate(_pack(train_ex, device, max_tokens=4096), prefix="")
    seconds = time.perf_counter() - t0
    print(f"training pairs ({len(train_ex)}), after training: reward accuracy {train_final['rewards/accuracies']:.2f}, "
          f"reward margin {train_final['rewards/margins']:+.3f}, loss {train_final['loss']:.4f}", file=out)
    print(f"held-out prompts ({len(eval_ex)} pairs never trained on): reward accuracy "
          f"{final['rewards/accuracies']:.2f} (chance 0.50), reward margin {final['rewards/margins']:+.3f} "
          f"(chance 0), loss {final['loss']:.4f} (chance {0.6931:.4f})", file=out)
    plot = None
    if args.plot:
        from .plot import plot_history

        plot = plot_history(history, args.plot, title=f"dpo-fast demo: {steps} steps, random Llama "
                                                         f"{n_params / 1e6:.2f}M, {device}")
        print(f"plot: {plot}", file=out)
    print(f"done in {seconds:.1f}s", file=out)
    return {"history": history, "final": final, "train_final": train_final, "plot": plot, "seconds": seconds}


def main(argv=None) -> int:
    """Entry point of ``dpo-fast demo``; returns the exit status. A missing optional dependency raises
    :class:`dpo_fast.extras.MissingExtraError` (the CLI prints its one line)."""
    run(argv)
    return 0


if __name__ == "__main__":  # python -m dpo_fast.demo: the same as `dpo-fast demo`
    from dpo_fast.cli import main as _cli

    sys.exit(_cli(["demo", *sys.argv[1:]]))
