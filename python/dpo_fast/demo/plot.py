"""The demo's PNG: loss, rewards/margin and reward accuracy over training steps (matplotlib, Agg)."""

from __future__ import annotations


def plot_history(history: list[dict], path: str, *, title: str = "dpo-fast demo") -> str:
    """Write a 3-panel PNG of ``history`` (one dict of metrics per step, TRL names) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(steps, [h["loss"] for h in history], color="tab:blue", lw=1, alpha=0.5, label="train (batch)")
    ev = [h for h in history if "eval/loss" in h]
    if ev:
        ax[0].plot([h["step"] for h in ev], [h["eval/loss"] for h in ev], "o-", color="tab:red", label="held-out")
    ax[0].axhline(0.6931, color="gray", ls=":", lw=1, label="ln 2 (chance)")
    ax[0].set_title("DPO loss")
    ax[0].legend(fontsize=8)
    ax[1].plot(steps, [h["rewards/chosen"] for h in history], color="tab:green", lw=1, label="chosen reward")
    ax[1].plot(steps, [h["rewards/rejected"] for h in history], color="tab:orange", lw=1, label="rejected reward")
    ax[1].plot(steps, [h["rewards/margins"] for h in history], color="tab:blue", lw=1.5, label="margin")
    if ev:
        ax[1].plot([h["step"] for h in ev], [h["eval/rewards/margins"] for h in ev], "o-", color="tab:red",
                   label="held-out margin")
    ax[1].axhline(0.0, color="gray", ls=":", lw=1)
    ax[1].set_title("rewards  β·log(π/π_ref)")
    ax[1].legend(fontsize=8)
    ax[2].plot(steps, [h["rewards/accuracies"] for h in history], color="tab:blue", lw=1, alpha=0.5,
               label="train (batch)")
    if ev:
        ax[2].plot([h["step"] for h in ev], [h["eval/rewards/accuracies"] for h in ev], "o-", color="tab:red",
                   label="held-out")
    ax[2].axhline(0.5, color="gray", ls=":", lw=1, label="chance")
    ax[2].set_ylim(-0.02, 1.02)
    ax[2].set_title("reward accuracy")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
