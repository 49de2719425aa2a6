"""The trainer adapter's shared pieces: options from a TRL config by field name, and the refusal of
sequence-sharded configs (context / sequence parallelism) with the own-loop recipe."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dpo_fast.losses import GRPOOptions, KTOOptions

adapter = pytest.importorskip("dpo_fast.integrations.adapter")


def test_options_from_trainer_reads_fields_by_name():
    args = SimpleNamespace(beta=0.3, desirable_weight=2.0, undesirable_weight=0.5, loss_type="kto")
    trainer = SimpleNamespace(args=args, beta=0.7)  # the trainer's resolved attribute beats its config's field
    opts = adapter.options_from_trainer(KTOOptions, trainer, per_step=("loss_type",))
    assert (opts.beta, opts.desirable_weight, opts.undesirable_weight) == (0.7, 2.0, 0.5)
    assert opts.loss_type == KTOOptions().loss_type  # per_step: left at its default
    opts = adapter.options_from_trainer(KTOOptions, trainer, desirable_weight=3.0)  # an override beats both
    assert opts.desirable_weight == 3.0
    with pytest.raises(TypeError, match="no field"):
        adapter.options_from_trainer(KTOOptions, trainer, not_an_option=1)
    with pytest.raises(ValueError):  # validated by the dataclass
        adapter.options_from_trainer(KTOOptions, SimpleNamespace(args=SimpleNamespace(beta=-1.0)))


def test_a_grpo_option_named_as_trl_names_it_needs_no_trainer_edit():
    """Every GRPOOptions field that GRPOConfig has reaches the options from the config alone."""
    import dataclasses

    trl = pytest.importorskip("trl")
    cfg_fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    values = {"delta": 1.5, "vespo_k_pos": 3.0, "sapo_temperature_neg": 0.9, "max_completion_length": 17}
    assert set(values) <= cfg_fields
    opts = adapter.options_from_trainer(GRPOOptions, SimpleNamespace(args=SimpleNamespace(**values)))
    assert {k: getattr(opts, k) for k in values} == values


@pytest.mark.parametrize("sizes,found", [({}, None), ({"cp_size": 1, "sp_size": 1}, None),
                                         ({"cp_size": 2}, "cp_size=2"), ({"sp_size": 4}, "sp_size=4"),
                                         ({"cp_size": 2, "sp_size": 2}, "cp_size=2, sp_size=2")])
def test_sequence_sharding_is_read_from_parallelism_config(sizes, found):
    pc = SimpleNamespace(**{"cp_size": 1, "sp_size": 1, **sizes})
    assert adapter.sequence_sharding(SimpleNamespace(parallelism_config=pc)) == found
    assert adapter.sequence_sharding(SimpleNamespace(parallelism_config=None)) is None
    assert adapter.sequence_sharding(None) is None


def test_fast_dpo_trainer_refuses_a_sequence_sharded_config_with_the_recipe(tmp_path):
    pytest.importorskip("trl")
    from accelerate.parallelism_config import ParallelismConfig
    from trl import DPOConfig

    from dpo_fast.integrations.trl import FastDPOTrainer
    from support.trainer_fixtures import char_tokenizer, sums_dataset, tiny_llama

    model, ref = tiny_llama()
    args = DPOConfig(output_dir=str(tmp_path), parallelism_config=ParallelismConfig(cp_size=2), use_cpu=True,
                     report_to=[])
    with pytest.raises(NotImplementedError, match=r"cp_size=2.*sequence_parallel\(hidden, group\)"):
        FastDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=sums_dataset(),
                       processing_class=char_tokenizer())
    # positional config too (DPOTrainer(model, ref_model, args, ...))
    with pytest.raises(NotImplementedError, match="DISTRIBUTED.md"):
        FastDPOTrainer(model, ref, args, train_dataset=sums_dataset(), processing_class=char_tokenizer())
