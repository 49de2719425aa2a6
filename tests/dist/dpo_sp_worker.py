"""FastDPOTrainer with DeepSpeed Ulysses sequence parallelism (``accelerate launch``, ZeRO-3, 2 CPU processes,
``sp_size=2``), or its single-process reference: ``python tests/dist/dpo_sp_worker.py OUT {sp|single}``.

Writes OUT.json (every logged metric of every step, the row layout seen, what evaluate() did) and OUT.pt (the
trained policy's parameters, gathered from the ZeRO-3 partitions). Plain SGD and no clipping (``max_grad_norm``
huge, so the norm is still logged): a gradient off by the sequence group's size would change the update, which
Adam would hide.
Under sp, each step trains one rank's batch of 2 pairs cut into 2 token blocks (the step count is per batch),
so the reference is one process at 2 pairs per step over the same sampler order.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from support.trl_fixtures import char_tokenizer, logged, sums_dataset, tiny_llama  # noqa: E402

STEPS, PAIRS = 3, 2


def main():
    out, mode = sys.argv[1], sys.argv[2]
    from trl import DPOConfig

    from dpo_fast.integrations import FastDPOTrainer

    extra = {}
    if mode == "sp":
        from accelerate.parallelism_config import ParallelismConfig
        from accelerate.utils import DeepSpeedSequenceParallelConfig

        handler = DeepSpeedSequenceParallelConfig(sp_attn_implementation="sdpa")
        extra["parallelism_config"] = ParallelismConfig(sp_size=2, sp_backend="deepspeed", sp_handler=handler)
    model, ref = tiny_llama(64)
    seen = []
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, per_device_train_batch_size=PAIRS, max_steps=STEPS, logging_steps=1,
                         learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e6,
                         report_to=[], save_strategy="no", use_cpu=True, seed=0, beta=0.1, bf16=False,
                         disable_tqdm=True, dataloader_num_workers=0, dataloader_drop_last=True, max_length=32,
                         **extra)
        tr = FastDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=sums_dataset(),
                            processing_class=char_tokenizer())
        step = tr._compute_loss

        def spy(model, inputs, return_outputs):
            if tr.model.training:
                seen.append(list(inputs["input_ids"].shape))
            return step(model, inputs, return_outputs)

        tr._compute_loss = spy
        tr.train()
        logs = [{k: v for k, v in h.items() if k not in ("epoch", "learning_rate")} for h in logged(tr)]
        try:  # refused under sequence parallelism (sequence_sharded.EVAL_REFUSED)
            tr.evaluate(sums_dataset(8, seed=1))
            evaluated = "ran"
        except NotImplementedError as e:
            evaluated = str(e)
        net = tr.accelerator.unwrap_model(tr.model)
        params = list(net.parameters())
        if mode == "sp":
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                state = {n: p.detach().clone() for n, p in net.named_parameters()}
        else:
            state = {n: p.detach().clone() for n, p in net.named_parameters()}
        info = {"logs": logs, "evaluate": evaluated, "rows": seen, "world": int(os.environ.get("WORLD_SIZE", "1")),
                "wrapper": type(tr.model_wrapped).__name__, "routes": dict(tr.dpo_fast_routes)}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
