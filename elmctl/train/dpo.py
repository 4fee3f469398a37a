"""Instruction-tuning objectives as pure functions: DPO (sigmoid), hinge (RSO/SLiC) and SFT.

The losses follow TRL's DPOTrainer, which alignment-handbook ran for OpenELM (facts §2). For a
pair (x, y_w, y_l), with log-probs summed over the completion tokens only:

    z   = [log πθ(y_w|x) − log πθ(y_l|x)] − [log π_ref(y_w|x) − log π_ref(y_l|x)]
    sigmoid (DPO, Rafailov et al. 2023 eq. 7):  L = −log σ(β z)
    hinge   (RSO, Liu et al. 2023 eq. 7):       L = max(0, 1 − β z)
    rewards r_w = β (log πθ(y_w|x) − log π_ref(y_w|x)), r_l likewise
    reward accuracy = mean[r_w > r_l],  reward margin = mean[r_w − r_l]
    sft: NLL of the chosen answer, prompt masked (:func:`sft_loss`)

Batch layout (elmctl.data.preference.collate_pairs): rows 0..B-1 are the chosen answers, rows
B..2B-1 the rejected ones; ``labels[:, t]`` is the token position t must predict, -100 where ignored
(prompt, padding). So logits at position t are scored against ``labels[:, t]``: no shift here.

Shapes: B pairs, N = 2B rows, L sequence length, V vocabulary rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from elmctl.data import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    from elmctl.config.schema import PreferenceLoss

__all__ = [
    "sequence_logps",
    "split_pair_logps",
    "dpo_losses",
    "preference_metrics",
    "sft_loss",
]



def sequence_logps(logits_NLV: torch.Tensor, labels_NL: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label_t) over the positions whose label is not IGNORE_INDEX.

    Args:
        logits_NLV: float logits, position t scores the token ``labels_NL[:, t]``.
        labels_NL: target ids, IGNORE_INDEX where a position does not count.

    Returns:
        Tensor[N] of summed log-probs, in float32 (bf16 sums over hundreds of tokens lose the
        small policy/reference differences DPO is made of).
    """
    mask_NL = labels_NL != IGNORE_INDEX
    safe_labels_NL = labels_NL.masked_fill(~mask_NL, 0)
    # cross_entropy = logsumexp - logit[label], in fp32 without materialising a full log_softmax copy
    nll_NL = F.cross_entropy(
        logits_NLV.float().transpose(1, 2), safe_labels_NL, reduction="none"
    )
    return -(nll_NL * mask_NL).sum(dim=-1)


def split_pair_logps(logps_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen rows | rejected rows] -> (chosen[B], rejected[B])."""
    if logps_N.shape[0] % 2:
        raise ValueError(f"a preference batch has an even number of rows, got {logps_N.shape[0]}")
    chosen_B, rejected_B = logps_N.chunk(2, dim=0)
    return chosen_B, rejected_B


def dpo_losses(
    policy_chosen_B: torch.Tensor,
    policy_rejected_B: torch.Tensor,
    ref_chosen_B: torch.Tensor,
    ref_rejected_B: torch.Tensor,
    *,
    beta: float,
    loss_type: PreferenceLoss = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards.

    Returns:
        (losses[B], chosen_rewards[B], rejected_rewards[B]); the rewards are detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    z_B = (policy_chosen_B - policy_rejected_B) - (ref_chosen_B - ref_rejected_B)
    if loss_type == "sigmoid":
        # -log σ(βz), written with logsigmoid so large |βz| neither overflows nor loses precision
        losses_B = -F.logsigmoid(beta * z_B)
    elif loss_type == "hinge":
        losses_B = torch.relu(1.0 - beta * z_B)
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}; expected 'sigmoid' or 'hinge'")
    chosen_rewards_B = beta * (policy_chosen_B - ref_chosen_B).detach()
    rejected_rewards_B = beta * (policy_rejected_B - ref_rejected_B).detach()
    return losses_B, chosen_rewards_B, rejected_rewards_B


def preference_metrics(chosen_rewards_B: torch.Tensor, rejected_rewards_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means of what TRL logs besides the loss: reward accuracy (ties are not wins), reward margin,
    both rewards; detached scalar tensors (the loop averages them without a host sync)."""
    return {
        "reward_accuracy": (chosen_rewards_B > rejected_rewards_B).float().mean(),
        "reward_margin": (chosen_rewards_B - rejected_rewards_B).mean(),
        "chosen_reward": chosen_rewards_B.mean(),
        "rejected_reward": rejected_rewards_B.mean(),
    }


def sft_loss(logits_NLV: torch.Tensor, labels_NL: torch.Tensor) -> torch.Tensor:
    """NLL of the answers, prompt and padding masked: per-token mean within each answer, then the
    mean over answers.

    Every example weighs the same (as every pair does in DPO), so splitting a batch into
    micro-batches for gradient accumulation gives exactly the same gradient; a token mean over the
    micro-batch would not (its token count varies).
    """
    logps_N = sequence_logps(logits_NLV, labels_NL)
    num_tokens_N = (labels_NL != IGNORE_INDEX).sum(dim=-1).clamp(min=1)
    return (-logps_N / num_tokens_N).mean()
