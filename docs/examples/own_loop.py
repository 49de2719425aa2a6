# Use in your own loop: Rust packing, reference log-probs once, fused DPO loss from the decoder's hidden states.
import torch
from torch.utils.data import DataLoader

from dpo_fast.extras import require

require("transformers", "hf", feature="this example", exit=True)  # one line naming the extra if it is missing
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import dpo_fast  # noqa: E402
from dpo_fast.hf import call_with_hidden_states  # noqa: E402
from dpo_fast.reference import precompute_reference_logps  # noqa: E402

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4))
# tokenized preference pairs (TRL's keys); here random token ids
examples = [{"prompt_ids": torch.randint(1, 128, (5,)).tolist(), "chosen_ids": torch.randint(1, 128, (4,)).tolist(),
             "rejected_ids": torch.randint(1, 128, (6,)).tolist()} for _ in range(64)]

# 1. reference log-probs once (no-grad fused forward; cached on disk when cache_dir is given)
examples = precompute_reference_logps(model, examples, batch_size=32, progress=False)

# 2. padding-free batches: whole pairs packed into rows by the Rust packer
loader = DataLoader(examples, batch_size=16, shuffle=True, collate_fn=dpo_fast.PairCollator(max_tokens=256))
loss_fn = dpo_fast.DPOLoss(beta=0.1)              # loss_type="sigmoid", "ipo", ["sigmoid", "sft"], ...
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

for batch in loader:
    def fused_loss(hidden, head):                 # runs inside model.forward: hidden (1, N, H), no logits
        return loss_fn(hidden.view(-1, hidden.shape[-1]), head.weight, batch["labels"].view(-1),
                       batch["ref_chosen_logps"], batch["ref_rejected_logps"], bias=head.bias,
                       cu_seqlens=batch["cu_seqlens"], pairs=batch["pairs"])

    out = call_with_hidden_states(model, fused_loss, batch["input_ids"], position_ids=batch["position_ids"],
                                  cu_seqlens=batch["cu_seqlens"])
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"loss {out.loss.item():.4f}  margin {out.metrics['rewards/margins']:+.4f}  "
          f"acc {out.metrics['rewards/accuracies']:.2f}")
