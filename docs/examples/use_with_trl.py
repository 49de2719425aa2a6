# Use with TRL: swap the trainer class (or patch an existing trainer). Tiny random model, no download.
import torch

from dpo_fast.extras import require

for _m in ("trl", "datasets", "tokenizers", "transformers"):
    require(_m, "trl", feature="this example", exit=True)  # one line naming the extra if one is missing
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig  # noqa: E402

from dpo_fast.integrations.trl import FastDPOTrainer  # noqa: E402  (was: from trl import DPOTrainer)

# a character-level tokenizer and a random Llama stand in for your tokenizer and checkpoint
vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("0123456789+=")}}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
model, ref_model = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
ref_model.load_state_dict(model.state_dict())

train = Dataset.from_list([{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                           for a in range(8) for b in range(8)])
args = DPOConfig(output_dir="/tmp/dpo_fast_trl_example", beta=0.1, loss_type=["sigmoid"], max_steps=3,
                 per_device_train_batch_size=8, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                 bf16=False)
trainer = FastDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train,
                         processing_class=tokenizer)
trainer.train()                                   # same loss and metrics as trl.DPOTrainer, fused
print({k: round(v, 4) for k, v in trainer.state.log_history[-2].items() if k.startswith(("loss", "rewards/"))})

# an existing trl.DPOTrainer instance:   from dpo_fast.integrations.trl import patch_trainer
#                                        trainer = patch_trainer(trainer)
