"""Drop-in integrations with training frameworks.

- :mod:`dpo_fast.integrations.trl`: ``FastDPOTrainer`` (a ``trl.DPOTrainer`` subclass) and
  ``patch_trainer`` for an existing ``DPOTrainer`` instance.
- :mod:`dpo_fast.integrations.trl_grpo`: ``FastGRPOTrainer`` / ``patch_grpo_trainer`` (``trl.GRPOTrainer``).
- :mod:`dpo_fast.integrations.trl_kto`: ``FastKTOTrainer`` / ``patch_kto_trainer`` (``trl.KTOTrainer``).
- :mod:`dpo_fast.integrations.trl_cpo_orpo`: ``FastCPOTrainer`` / ``FastORPOTrainer`` and ``patch_cpo_trainer`` /
  ``patch_orpo_trainer`` (``trl.experimental``'s CPO and ORPO trainers).

Shared trainer plumbing (TRL version gate, class patching, the no-grad forward) is in ``_trainer_common``.

Each integration imports its framework only when imported itself.
"""
