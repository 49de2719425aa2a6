"""Fixtures for the vision-language-model tests and benchmark (tests/integrations/test_vlm.py,
benches/bench_vlm.py): tiny random VLMs built from the configs transformers ships (no download), a processor built
locally for each, small random images, datasets and trainer factories. Needs trl, datasets, tokenizers, PIL and
transformers.

Kinds (:func:`tiny_vlm`):

* ``"qwen2_vl"``: Qwen2-VL (``image_grid_thw``, ``mm_token_type_ids``, 3-D M-RoPE positions), 28x28 and 28x56
  images (4 or 8 patches, merged to 1 or 2 image tokens);
* ``"llava"``: LLaVA (CLIP tower, ``<image>`` placeholders), 28x28 images (4 patches + CLS);
* ``"gemma3"``: Gemma-3 (SigLIP tower, ``token_type_ids`` for the bidirectional attention over image tokens,
  sliding and full attention layers), 28x28 images pooled to 4 image tokens; ``softcap`` sets the text config's
  ``final_logit_softcapping`` (None, as in the released Gemma-3 checkpoints, by default).

Each processor pairs the image processor's PIL class (small sizes) with a WordLevel tokenizer over
:data:`SPECIAL` + :data:`WORDS` and a tiny chat template (``role : text``, the model's image placeholder for an
image, ``<eos>`` after each finished turn).
"""

from __future__ import annotations

import numpy as np
import torch

from .trainer_fixtures import logged

__all__ = ["SPECIAL", "GEMMA3_SPECIAL", "WORDS", "TEMPLATE", "KINDS", "tokenizer", "processor", "tiny_vlm", "image",
           "preference_dataset", "prompts_dataset", "unpaired_dataset", "word_reward", "COMMON", "DPO_METRICS",
           "make_dpo", "make_grpo", "make_rloo", "make_kto", "logged"]

SPECIAL = ["<pad>", "<eos>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>"]
#: Gemma-3's begin-of-image, end-of-image and image (soft) tokens, in the "gemma3" kind's vocabulary only
GEMMA3_SPECIAL = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
WORDS = "user assistant : a b c d what is this cat dog red blue yes no one two".split()
# role : text, images as the model's placeholder; each finished turn ends with <eos>
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : "
            "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}IMAGE {% else %}{{ p['text'] }} {% endif %}{% endfor %}{% endif %}"
            "{% if not loop.last or m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
QWEN_IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"
KINDS = ("qwen2_vl", "llava", "gemma3")
#: image tokens per Gemma-3 image (mm_tokens_per_image: the 2x2 patches of a 28x28 image, pooled 1x1)
GEMMA3_IMAGE_TOKENS = 4


def tokenizer(extra_vocab=0, kind=None):
    """A WordLevel tokenizer over SPECIAL (+ GEMMA3_SPECIAL for ``kind="gemma3"``, as the named boi / eoi / image
    tokens Gemma3Processor reads) + WORDS (+ ``extra_vocab`` unused filler words, for benchmarks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL + (GEMMA3_SPECIAL if kind == "gemma3" else [])
    vocab = {t: i for i, t in enumerate(special + WORDS + [f"w{i}" for i in range(extra_vocab)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "gemma3":
        named = dict(zip(("boi_token", "eoi_token", "image_token"), GEMMA3_SPECIAL))
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                       extra_special_tokens=named)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=SPECIAL[2:])


def _qwen_processor(tok):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class TinyQwen2VLProcessor(transformers.Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 56)
    return TinyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=TEMPLATE.replace("IMAGE", QWEN_IMAGE))


def _llava_processor(tok):
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ip = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=TEMPLATE.replace("IMAGE", "<image>"), image_token="<image>")


def _gemma3_processor(tok):
    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    # the placeholder in the text is the begin-of-image token; the processor expands it to boi, image tokens, eoi
    return transformers.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=GEMMA3_IMAGE_TOKENS,
                                        chat_template=TEMPLATE.replace("IMAGE", GEMMA3_SPECIAL[0]))


def processor(kind, extra_vocab=0):
    """The locally built processor of ``kind`` (see the module docstring)."""
    tok = tokenizer(extra_vocab, kind)
    return {"qwen2_vl": _qwen_processor, "llava": _llava_processor, "gemma3": _gemma3_processor}[kind](tok)


def _text_config(vocab, **extra):
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                **extra)


def _config(kind, tok, softcap):
    import transformers

    ids = tok.convert_tokens_to_ids
    if kind == "qwen2_vl":
        return transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig(
            text_config=_text_config(len(tok), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                               "rope_theta": 10000.0}),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"))
    if kind == "llava":
        return transformers.LlavaForConditionalGeneration, transformers.LlavaConfig(
            text_config=dict(model_type="llama", **_text_config(len(tok))),
            vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                               projection_dim=16),
            image_token_id=ids("<image>"), vision_feature_layer=-1, vision_feature_select_strategy="default",
            projector_hidden_act="gelu")
    if kind == "gemma3":
        return transformers.Gemma3ForConditionalGeneration, transformers.Gemma3Config(
            text_config=_text_config(len(tok), head_dim=16, sliding_window=16, final_logit_softcapping=softcap,
                                     layer_types=["sliding_attention", "full_attention"]),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=GEMMA3_IMAGE_TOKENS, image_token_index=tok.image_token_id,
            boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id)
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def tiny_vlm(kind, seed=0, extra_vocab=0, softcap=None):
    """(model, processor): a tiny random ``kind`` VLM (see :data:`KINDS`), seeded, sdpa attention; ``softcap``:
    Gemma-3's text-config ``final_logit_softcapping``."""
    if softcap is not None and kind != "gemma3":
        raise ValueError("softcap: only the gemma3 kind declares one")
    proc = processor(kind, extra_vocab)
    cls, cfg = _config(kind, proc.tokenizer, softcap)
    cfg._attn_implementation = "sdpa"
    cfg.get_text_config()._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg)
    if kind == "gemma3":  # transformers initialises Gemma-3's projector to zeros: images would change nothing
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.1)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model, proc


def image(i, wide=False):
    """A seeded random 28x28 (``wide``: 28x56) RGB PIL image."""
    from PIL import Image

    rs = np.random.RandomState(i)
    return Image.fromarray(rs.randint(0, 255, (28, 56 if wide else 28, 3), dtype=np.uint8))


_ANSWERS = ["cat", "dog", "red cat", "blue dog", "yes", "no", "one", "two"]


def preference_dataset(n=8, kind="qwen2_vl", images=True):
    """``n`` conversational preference rows, each with one image (Qwen2-VL: every other one wide) unless
    ``images=False``."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        content = ([{"type": "image"}] if images else []) + [{"type": "text", "text": "what is this"}]
        row = {"prompt": [{"role": "user", "content": content}],
               "chosen": [{"role": "assistant", "content": _ANSWERS[i % 8]}],
               "rejected": [{"role": "assistant", "content": _ANSWERS[(i + 3) % 8] + " a b"}]}
        if images:
            row["images"] = [image(i, wide=kind == "qwen2_vl" and i % 2 == 1)]
        rows.append(row)
    return Dataset.from_list(rows)


def prompts_dataset(n=8, kind="qwen2_vl"):
    """``n`` conversational prompts with one image each (GRPO / RLOO)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "what is this"}]}],
                               "image": image(i, wide=kind == "qwen2_vl" and i % 2 == 1)} for i in range(n)])


def unpaired_dataset(n=8, kind="qwen2_vl"):
    """KTO rows from :func:`preference_dataset`: the chosen completion (label True) or, every third row, the
    rejected one (False)."""
    from datasets import Dataset

    rows = []
    for i, r in enumerate(preference_dataset(n, kind)):
        good = i % 3 != 0
        rows.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good,
                     "images": r["images"]})
    return Dataset.from_list(rows)


def word_reward(completions, **kwargs):
    """Deterministic: the share of 'cat' / 'dog' words in each completion."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(w in ("cat", "dog") for w in t.split()) / max(len(t.split()), 1) for t in texts]


COMMON = dict(max_steps=3, logging_steps=1, learning_rate=5e-3, report_to=[], save_strategy="no", use_cpu=True,
              seed=0, bf16=False, disable_tqdm=True, dataloader_num_workers=0)

DPO_METRICS = ["loss", "grad_norm", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy",
               "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"]


def make_dpo(fast, out_dir, kind="qwen2_vl", images=True, extra_vocab=0, softcap=None, **cfg):
    """A DPO trainer (stock trl.DPOTrainer or FastDPOTrainer) on a tiny VLM and its reference copy; ``cfg``
    overrides DPOConfig fields."""
    from trl import DPOConfig, DPOTrainer

    from dpo_fast.integrations.trl import FastDPOTrainer

    model, proc = tiny_vlm(kind, extra_vocab=extra_vocab, softcap=softcap)
    ref, _ = tiny_vlm(kind, extra_vocab=extra_vocab, softcap=softcap)
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, beta=0.1, **{**COMMON, **cfg})
    cls = FastDPOTrainer if fast else DPOTrainer
    return cls(model=model, ref_model=ref, args=args, train_dataset=preference_dataset(kind=kind, images=images),
               processing_class=proc)


def _saved(out_dir, kind, softcap):
    """The tiny VLM saved beside ``out_dir`` (once): with beta > 0 TRL loads its reference copy from the path."""
    from pathlib import Path

    path = Path(out_dir).parent / f"{kind}_{softcap}_model"
    if not path.exists():
        tiny_vlm(kind, softcap=softcap)[0].save_pretrained(str(path))
    return str(path)


_GRPO = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
             learning_rate=0.05, model_init_kwargs={"dtype": torch.float32})


def make_grpo(fast, out_dir, kind="qwen2_vl", softcap=None, **cfg):
    """A GRPO trainer (stock or FastGRPOTrainer) on the saved tiny VLM, rewarded by :func:`word_reward`."""
    from trl import GRPOConfig, GRPOTrainer

    from dpo_fast.integrations.trl_grpo import FastGRPOTrainer

    args = GRPOConfig(output_dir=str(out_dir), **{**COMMON, **_GRPO, **cfg})
    cls = FastGRPOTrainer if fast else GRPOTrainer
    return cls(model=_saved(out_dir, kind, softcap), reward_funcs=word_reward, args=args,
               train_dataset=prompts_dataset(kind=kind), processing_class=processor(kind))


def make_rloo(fast, out_dir, kind="qwen2_vl", softcap=None, **cfg):
    """An RLOO trainer (stock or FastRLOOTrainer) on the saved tiny VLM, as :func:`make_grpo`."""
    from trl import RLOOConfig, RLOOTrainer

    from dpo_fast.integrations.trl_grpo import FastRLOOTrainer

    args = RLOOConfig(output_dir=str(out_dir), **{**COMMON, **_GRPO, **cfg})
    cls = FastRLOOTrainer if fast else RLOOTrainer
    return cls(model=_saved(out_dir, kind, softcap), reward_funcs=word_reward, args=args,
               train_dataset=prompts_dataset(kind=kind), processing_class=processor(kind))


def make_kto(fast, out_dir, kind="qwen2_vl", softcap=None, **cfg):
    """A KTO trainer (stock or FastKTOTrainer) on the saved tiny VLM and :func:`unpaired_dataset`."""
    from trl import KTOConfig, KTOTrainer

    from dpo_fast.integrations.trl_kto import FastKTOTrainer

    args = KTOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, beta=0.1,
                     model_init_kwargs={"dtype": torch.float32}, **{**COMMON, **cfg})
    cls = FastKTOTrainer if fast else KTOTrainer
    return cls(model=_saved(out_dir, kind, softcap), args=args, train_dataset=unpaired_dataset(kind=kind),
               processing_class=processor(kind))
