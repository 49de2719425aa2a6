"""Drop-in integrations with training frameworks.

- :mod:`dpo_fast.integrations.trl`: ``FastDPOTrainer`` (a ``trl.DPOTrainer`` subclass) and
  ``patch_trainer`` for an existing ``DPOTrainer`` instance.

Each integration imports its framework only when imported itself.
"""
