# Call the kernels directly: log-probs and the DPO loss from hidden states and the lm_head weight.
import torch

import dpo_fast

torch.manual_seed(0)
P, T, H, V = 4, 96, 256, 32000                    # pairs, positions, hidden size, vocabulary
hidden = torch.randn(2 * P, T, H, requires_grad=True)      # last hidden states [chosen..., rejected...]
weight = (torch.randn(V, H) / H**0.5).requires_grad_()     # lm_head.weight
labels = torch.randint(0, V, (2 * P, T))                   # already shifted: labels[t] is predicted from hidden[t]
labels[:, :32] = -100                                       # prompt positions are not scored

# per-sequence log-probs, never allocating the (2P, T, V) logits
logps = dpo_fast.sequence_logprobs(hidden, weight, labels)          # (2P,) float32
reference = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
assert torch.allclose(logps, (reference * (labels != -100)).sum(-1), atol=1e-3)

# the fused DPO loss: loss and gradients in one pass over the logits
ref_chosen, ref_rejected = logps.detach()[:P] - 0.5, logps.detach()[P:] + 0.5
out = dpo_fast.DPOLoss(beta=0.1)(hidden, weight, labels, ref_chosen, ref_rejected)
out.loss.backward()                               # grads in hidden.grad and weight.grad
print(f"loss {out.loss.item():.4f}", {k: round(v, 4) for k, v in out.metrics.items()})

# the loss alone, on log-probs you already have
print(dpo_fast.dpo_loss(logps[:P], logps[P:], ref_chosen, ref_rejected, beta=0.1, loss_type="ipo",
                        chosen_lengths=torch.full((P,), 64), rejected_lengths=torch.full((P,), 64)).loss)
