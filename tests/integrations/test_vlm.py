"""Vision-language models in FastDPOTrainer / FastGRPOTrainer / FastKTOTrainer and dpo_fast.hf (issue 23).

Tiny random VLMs built from the configs transformers ships (no download): Qwen2-VL (``image_grid_thw``,
``mm_token_type_ids``, 3-D M-RoPE positions) and LLaVA (CLIP tower, ``<image>`` placeholders), each with a
processor built locally (a WordLevel tokenizer, the image processor's PIL class with small sizes, a tiny chat
template) and random 28x28 / 28x56 images. Stock TRL and the fast trainer run the same data and seed; their
logged metrics must agree over several steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("PIL")

import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from dpo_fast import hf as H  # noqa: E402
from support.trainer_fixtures import assert_same_logs, logged  # noqa: E402

SPECIAL = ["<pad>", "<eos>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>"]
WORDS = "user assistant : a b c d what is this cat dog red blue yes no one two".split()
# role : text, images as the model's placeholder; each finished turn ends with <eos>
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : "
            "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}IMAGE {% else %}{{ p['text'] }} {% endif %}{% endfor %}{% endif %}"
            "{% if not loop.last or m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
QWEN_IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"


def tokenizer(extra_vocab=0):
    """A WordLevel tokenizer over SPECIAL + WORDS (+ ``extra_vocab`` unused filler words, for benchmarks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + [f"w{i}" for i in range(extra_vocab)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=SPECIAL[2:])


def _qwen_processor(extra_vocab=0):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class TinyQwen2VLProcessor(transformers.Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 56)
    return TinyQwen2VLProcessor(image_processor=ip, tokenizer=tokenizer(extra_vocab),
                                chat_template=TEMPLATE.replace("IMAGE", QWEN_IMAGE))


def _llava_processor(extra_vocab=0):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ip = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tokenizer(extra_vocab), patch_size=14,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=TEMPLATE.replace("IMAGE", "<image>"), image_token="<image>")


def _text_config(vocab, **extra):
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                **extra)


def tiny_vlm(kind, seed=0, extra_vocab=0):
    """(model, processor): a tiny random ``kind`` ("qwen2_vl" or "llava") VLM, seeded, sdpa attention."""
    tok = tokenizer(extra_vocab)
    if kind == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(
            text_config=_text_config(len(tok), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                      "rope_theta": 10000.0}),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
        cls, proc = transformers.Qwen2VLForConditionalGeneration, _qwen_processor(extra_vocab)
    else:
        cfg = transformers.LlavaConfig(
            text_config=dict(model_type="llama", **_text_config(len(tok))),
            vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                               projection_dim=16),
            image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
            vision_feature_select_strategy="default", projector_hidden_act="gelu")
        cls, proc = transformers.LlavaForConditionalGeneration, _llava_processor(extra_vocab)
    cfg._attn_implementation = "sdpa"
    cfg.get_text_config()._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model, proc


def _image(i, wide=False):
    rs = np.random.RandomState(i)
    return Image.fromarray(rs.randint(0, 255, (28, 56 if wide else 28, 3), dtype=np.uint8))


_ANSWERS = ["cat", "dog", "red cat", "blue dog", "yes", "no", "one", "two"]


def preference_dataset(n=8, kind="qwen2_vl", images=True):
    from datasets import Dataset

    rows = []
    for i in range(n):
        content = ([{"type": "image"}] if images else []) + [{"type": "text", "text": "what is this"}]
        row = {"prompt": [{"role": "user", "content": content}],
               "chosen": [{"role": "assistant", "content": _ANSWERS[i % 8]}],
               "rejected": [{"role": "assistant", "content": _ANSWERS[(i + 3) % 8] + " a b"}]}
        if images:
            row["images"] = [_image(i, wide=kind == "qwen2_vl" and i % 2 == 1)]
        rows.append(row)
    return Dataset.from_list(rows)


COMMON = dict(max_steps=3, logging_steps=1, learning_rate=5e-3, report_to=[], save_strategy="no", use_cpu=True,
              seed=0, bf16=False, disable_tqdm=True, dataloader_num_workers=0)


def make_dpo(fast, out_dir, kind="qwen2_vl", images=True, extra_vocab=0, **cfg):
    """A DPO trainer (stock trl.DPOTrainer or FastDPOTrainer) on a tiny VLM and its reference copy."""
    from trl import DPOConfig, DPOTrainer

    from dpo_fast.integrations.trl import FastDPOTrainer

    model, proc = tiny_vlm(kind, extra_vocab=extra_vocab)
    ref, _ = tiny_vlm(kind, extra_vocab=extra_vocab)
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, beta=0.1, **{**COMMON, **cfg})
    cls = FastDPOTrainer if fast else DPOTrainer
    return cls(model=model, ref_model=ref, args=args, train_dataset=preference_dataset(kind=kind, images=images),
               processing_class=proc)


DPO_METRICS = ["loss", "grad_norm", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy",
               "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"]


# ------------------------------------------------------------------------------------------------ dpo_fast.hf


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_head_and_hidden_states_reproduce_vlm_logits(kind):
    """The outer lm_head + the body's last hidden states (vision inputs passed) give the model's own logits."""
    model, proc = tiny_vlm(kind)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    batch = proc(images=[_image(0), _image(1)], text=[text, text], return_tensors="pt")
    assert "pixel_values" in batch
    with torch.no_grad():
        logits = model(**batch).logits
        ids = batch.pop("input_ids")
        hidden, head = H.hidden_states_from_model(model, ids, **batch)
    assert head.weight is model.lm_head.weight and head.softcap is None and head.temperature == 1.0
    torch.testing.assert_close(hidden @ head.weight.T, logits, rtol=1e-5, atol=1e-5)


def _gemma3(softcap):
    cfg = transformers.Gemma3Config(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                         final_logit_softcapping=softcap, sliding_window=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=1, image_token_index=5, boi_token_index=6, eoi_token_index=7)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.Gemma3ForConditionalGeneration(cfg)


def test_gemma3_vlm_head_is_what_its_forward_computes():
    """Gemma3ForConditionalGeneration (transformers 5.25) does not apply text_config.final_logit_softcapping, unlike
    Gemma3ForCausalLM: the head found is the one its forward computes (checked against its logits)."""
    model = _gemma3(softcap=2.0)
    head = H.check_output_head(model)
    assert head.softcap is None and head.weight is model.lm_head.weight


def test_unknown_vlm_layout_raises():
    """A VLM whose head sits in a nested causal LM (the pre-5 layout) is refused, naming the class."""
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

    class NestedVLM(PreTrainedModel):
        config_class = PretrainedConfig
        base_model_prefix = "language_model"

        def __init__(self, config):
            super().__init__(config)
            self.vision_tower = torch.nn.Linear(4, 4)
            self.language_model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                               num_hidden_layers=1, num_attention_heads=2))

        def get_input_embeddings(self):
            return self.language_model.get_input_embeddings()

        def get_output_embeddings(self):
            return self.language_model.get_output_embeddings()

    with pytest.raises(H.UnsupportedHeadError, match="NestedVLM"):
        H.output_head(NestedVLM(PretrainedConfig()))


def test_unknown_vlm_class_with_a_scaled_text_head_raises():
    model, _ = tiny_vlm("llava")
    model.config.get_text_config().final_logit_softcapping = 30.0
    H.output_head(model)  # LLaVA is known: its forward applies no text-config scaling
    Renamed = type("MyVLMForConditionalGeneration", (type(model),), {})
    model.__class__ = Renamed
    with pytest.raises(H.UnsupportedHeadError, match="MyVLMForConditionalGeneration"):
        H.output_head(model)


# ------------------------------------------------------------------------------------------------ DPO


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_dpo_vlm_matches_stock(tmp_path, kind):
    stock = make_dpo(False, tmp_path / "a", kind)
    stock.train()
    fast = make_dpo(True, tmp_path / "b", kind)
    fast.train()
    assert not fast.dpo_fast_fallback_reasons and fast.dpo_fast_routes["fused"] == 3
    a, b = logged(stock), logged(fast)
    assert len(b) == 3
    assert_same_logs(a, b, keys=DPO_METRICS)


def test_dpo_text_only_batch_through_a_vlm(tmp_path):
    stock = make_dpo(False, tmp_path / "a", images=False, max_steps=2)
    stock.train()
    fast = make_dpo(True, tmp_path / "b", images=False, max_steps=2)
    fast.train()
    assert_same_logs(logged(stock), logged(fast), keys=DPO_METRICS)


def test_dpo_vlm_padding_free_is_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="padding_free=True is not supported with a vision-language"):
        make_dpo(True, tmp_path / "a", padding_free=True)


# ------------------------------------------------------------------------------------------------ GRPO


def prompts_dataset(n=8, kind="qwen2_vl"):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "what is this"}]}],
                               "image": _image(i, wide=kind == "qwen2_vl" and i % 2 == 1)} for i in range(n)])


def word_reward(completions, **kwargs):
    """Deterministic: the share of 'cat' / 'dog' words in each completion."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(w in ("cat", "dog") for w in t.split()) / max(len(t.split()), 1) for t in texts]


def make_grpo(fast, out_dir, kind="qwen2_vl", **cfg):
    from trl import GRPOConfig, GRPOTrainer

    from dpo_fast.integrations.trl_grpo import FastGRPOTrainer

    model, proc = tiny_vlm(kind)
    path = out_dir.parent / f"{kind}_model"  # a path: with beta > 0 TRL loads its reference copy from it
    if not path.exists():
        model.save_pretrained(str(path))
    opts = dict(COMMON, per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                learning_rate=0.05, model_init_kwargs={"dtype": torch.float32})
    opts.update(cfg)
    args = GRPOConfig(output_dir=str(out_dir), **opts)
    cls = FastGRPOTrainer if fast else GRPOTrainer
    return cls(model=str(path), reward_funcs=word_reward, args=args, train_dataset=prompts_dataset(kind=kind),
               processing_class=proc)


@pytest.mark.parametrize("kind, options", [
    ("qwen2_vl", dict(beta=0.1, num_iterations=2, epsilon=0.02)),  # reference and old-policy passes
    ("llava", dict(beta=0.1)),
])
def test_grpo_vlm_matches_stock(tmp_path, kind, options):
    stock = make_grpo(False, tmp_path / "a", kind, **options)
    stock.train()
    fast = make_grpo(True, tmp_path / "b", kind, **options)
    fast.train()
    assert fast.dpo_fast_routes["fused"] == fast.state.global_step
    a, b = logged(stock), logged(fast)
    assert "kl" in b[0] and "entropy" in b[0]
    assert_same_logs(a, b)


# ------------------------------------------------------------------------------------------------ KTO


def unpaired_dataset(n=8, kind="qwen2_vl"):
    from datasets import Dataset

    rows = []
    for i, r in enumerate(preference_dataset(n, kind)):
        good = i % 3 != 0
        rows.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good,
                     "images": r["images"]})
    return Dataset.from_list(rows)


def make_kto(fast, out_dir, kind="qwen2_vl", **cfg):
    from trl import KTOConfig, KTOTrainer

    from dpo_fast.integrations.trl_kto import FastKTOTrainer

    model, proc = tiny_vlm(kind)
    path = out_dir.parent / f"{kind}_model"  # TRL loads its reference copy from the path
    if not path.exists():
        model.save_pretrained(str(path))
    args = KTOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, beta=0.1,
                     model_init_kwargs={"dtype": torch.float32}, **{**COMMON, **cfg})
    cls = FastKTOTrainer if fast else KTOTrainer
    return cls(model=str(path), args=args, train_dataset=unpaired_dataset(kind=kind), processing_class=proc)


def test_kto_vlm_matches_stock(tmp_path):
    stock = make_kto(False, tmp_path / "a")
    stock.train()
    fast = make_kto(True, tmp_path / "b")
    fast.train()
    assert fast.dpo_fast_routes["fused"] == 3
    a, b = logged(stock), logged(fast)
    assert "kl" in b[0] and "logits/chosen" in b[0]
    assert_same_logs(a, b)


def test_gemma3_vlm_with_a_softcap_trl_would_apply_is_refused(tmp_path):
    """TRL's fused head caps Gemma3ForConditionalGeneration's logits by text_config.final_logit_softcapping; the
    model's own forward does not: the fast trainers refuse rather than pick one silently."""
    from trl import DPOConfig

    from dpo_fast.integrations.trl import FastDPOTrainer

    model = _gemma3(softcap=2.0)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **COMMON)
    tok = tokenizer()
    tok.chat_template = TEMPLATE
    with pytest.raises(NotImplementedError, match="Gemma3ForConditionalGeneration's forward does not apply"):
        FastDPOTrainer(model=model, ref_model=_gemma3(softcap=2.0), args=args,
                       train_dataset=preference_dataset(images=False), processing_class=tok)
