"""FastDPOTrainer under ``accelerate launch`` (2 CPU processes): writes the per-step logged losses to argv[1].

``python tests/dist/trainer_worker.py OUT.json PER_DEVICE_BATCH`` in a single process gives the reference.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from support.trl_fixtures import logged, make_trainer  # noqa: E402


def main():
    out, per_device = sys.argv[1], int(sys.argv[2])
    with tempfile.TemporaryDirectory() as d:
        tr = make_trainer("fast", d, steps=2, per_device_train_batch_size=per_device)
        tr.train()
        logs = [{k: v for k, v in h.items() if k in ("loss", "rewards/margins", "logps/chosen")} for h in logged(tr)]
        head = tr.accelerator.unwrap_model(tr.model).get_output_embeddings().weight
        info = {"logs": logs, "wrapper": type(tr.model_wrapped).__name__, "head": type(head).__name__,
                "zero3": hasattr(head, "ds_id"), "world": int(os.environ.get("WORLD_SIZE", "1"))}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
