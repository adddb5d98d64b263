"""DSPO, Direct Score Preference Optimization (Zhu, Xiao & Honavar, ICLR 2025): the preference objective as score
matching.

DSPO's stated idea is to fine-tune with the pretraining objective itself: **score matching** onto the score of the
human-preferred distribution, instead of the Bradley–Terry likelihood of eq. 14 on chain log-ratios. The preferred
distribution is the KL-optimal policy of eq. 5–6, p*(x_0|c) ∝ p_ref(x_0|c) exp(r(c, x_0)/β), whose score is the
reference's plus (1/β)∇r. The pairs tell where r rises: toward the winners' denoising targets and away from the
losers'. So at a noisy winner the policy's ε-prediction regresses onto the reference's moved 1/β of the way toward the
winner's noise, and at a noisy loser onto the reference's moved 1/β of the way away from it (derivation:
docs/derivation.md, "DSPO: the score form"). Provenance: the paper's full text was not available offline when this
was written; the objective is the project's derivation of the paper's stated idea, not a transcription.

Notation (code name → symbol; ε-prediction, every other prediction type is an affine map of it at fixed x_t):

================  ==================================================================================================
``x_w, x_l``      x^w_0, x^l_0, the preferred and rejected samples; (t, ε) shared by the pair as in eq. 14
``model_*``       ε_θ(x^*_t, t, c) (the network output; for v- or x_0-prediction the output and its target)
``ref_*``         ε_ref(x^*_t, t, c), no gradient
``target``        ε, the denoising-score-matching target: ∇ log q(x_t | x_0) = −ε / σ_t
``tgt_w``         ε_ref + (1/β)(ε − ε_ref) at x^w_t: s* = s_ref + (1/β)(s_q − s_ref), toward the winner
``tgt_l``         ε_ref − (1/β)(ε − ε_ref) at x^l_t: away from the loser
``ω``             ω(λ_t), the weight of the diffusion loss (eq. 2)
================  ==================================================================================================

Relation to eq. 14 (tested): at θ = θ_ref both objectives have the SAME gradient direction,
∇L ∝ ∇_θ[‖ε − ε_θ(x^w_t)‖² − ‖ε − ε_θ(x^l_t)‖²] (eq. 14 with factor s β ω σ(0), DSPO with factor 2/β); they
differ away from it: eq. 14 keeps pushing the loser's error up as long as log σ is unsaturated, DSPO's quadratic stops
at the finite target, so the update is bounded like pretraining's.

Implementation details (numbered):

1. The pairs, AI-feedback labels and (t, ε) draws are the DPO family's (`algos.dpo.DPO.predictions`).
2. Per-pixel mean of the squared residual, ω = 1 by default: the pretraining loss with a moved target.
3. Logged: the eq. 14 implicit-reward margin and its accuracy (same formula as ``dpo``, here in β of eq. 14 set to
   1 and the ``diffusers`` scale) so the two objectives are comparable on one run, and the two residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algos.dpo import DPO
from rlkit_diffusion.preference import implicit_margin, implicit_scale, per_sample_error, preference_accuracy


@dataclass
class DSPOConfig:
    """DSPO hyper-parameters."""

    beta: float = 10.0
    """β of p* ∝ p_ref exp(r/β): the target score moves 1/β of the reference's denoising residual (β > 0)."""
    weighting: str = "constant"
    """ω(λ_t): ``constant`` (pretraining's ε-loss), ``snr`` or ``min_snr`` (`algos.dpo.snr_weight`)."""
    t_min: int = 0
    """Smallest training timestep drawn."""
    t_max: int | None = None
    """One past the largest timestep drawn; None = T."""
    labels: str = "data"
    """Who labels the pairs: ``data`` or a reward name of the world (AI feedback, as in ``dpo``)."""

    # The fields DPO's shared pieces read (fixed for DSPO: errors are per-pixel means, no SFT term).
    @property
    def beta_convention(self) -> str:
        return "diffusers"

    @property
    def sft_weight(self) -> float:
        return 0.0


def dspo_loss(
    model: Tensor, ref: Tensor, target: Tensor, beta: float, *, weight: Tensor | None = None
) -> dict[str, Tensor]:
    """DSPO's score-matching loss on a batch of pairs with shared (t, ε).

    Line by line (ε-space; s = −ε/σ_t turns each line into scores)::

        tgt_w = ε_ref(x^w_t) + (1/β)(ε − ε_ref(x^w_t))       s*(x^w_t) = s_ref + (1/β)(∇log q(x^w_t|x^w_0) − s_ref)
        tgt_l = ε_ref(x^l_t) − (1/β)(ε − ε_ref(x^l_t))       s*(x^l_t) = s_ref − (1/β)(∇log q(x^l_t|x^l_0) − s_ref)
        L_w   = ‖ε_θ(x^w_t) − tgt_w‖²,   L_l = ‖ε_θ(x^l_t) − tgt_l‖²     (per-pixel mean: pretraining's loss, eq. 2)
        L     = E ω(λ_t) (L_w + L_l) / 2

    Args:
        model: (2B, ...) policy outputs, rows [:B] on x^w_t and [B:] on x^l_t (with gradient), as the rest of the
            family lays out a pair (`rlkit_diffusion.preference.paired_predictions`).
        ref: (2B, ...) reference outputs (no gradient).
        target: (2B, ...) the training targets (ε for both halves under ε-prediction: (t, ε) are shared).
        beta: β > 0 (β = 1: the winner's plain denoising loss and the loser's reflected one; β < 1 extrapolates).
        weight: ω(λ_t) (B,), default 1.

    Returns:
        ``loss``, ``score_loss_w``, ``score_loss_l`` (mean L_w, L_l).
    """
    if beta <= 0.0:
        raise ValueError(f"dspo: beta must be > 0 (the target moves 1/beta of the residual), got {beta}")
    model_w, model_l = model.chunk(2)  # (B, ...) each
    ref_w, ref_l = ref.detach().float().chunk(2)
    target_w, target_l = target.float().chunk(2)
    tgt_w = ref_w + (target_w - ref_w) / beta  # toward the winner
    tgt_l = ref_l - (target_l - ref_l) / beta  # away from the loser
    l_w = per_sample_error(model_w, tgt_w, "mean")  # (B,)
    l_l = per_sample_error(model_l, tgt_l, "mean")  # (B,)
    w = torch.ones_like(l_w) if weight is None else weight
    loss = (w * (l_w + l_l)).mean() / 2
    return {"loss": loss, "score_loss_w": l_w.detach().mean(), "score_loss_l": l_l.detach().mean()}


class DSPO(DPO):
    """DSPO on the world's preference pairs (`dspo_loss`): the DPO family's pairs and draws, a score-matching loss."""

    name = "dspo"
    config_class = DSPOConfig

    def implicit_reward_scale(self) -> tuple[float, str]:
        """The evaluation reports the eq. 14 implicit reward at β = 1, ``diffusers`` scale (detail 3)."""
        return 1.0, "diffusers"

    def loss(self, batch) -> dict[str, Tensor]:
        b = len(batch[0])
        p = self.predictions(*batch)  # rows [:B] winners, [B:] losers; shared (t, ε)
        model, ref, target = p["model"], p["ref"], p["target"]
        out = dspo_loss(model, ref, target, self.config.beta, weight=p["weight"])
        with torch.no_grad():
            m_err, r_err = per_sample_error(model, target, "mean"), per_sample_error(ref, target, "mean")
            margin = implicit_margin(m_err, r_err, implicit_scale(1.0, "diffusers", None, m_err[:b]))
        out["implicit_acc"] = preference_accuracy(margin)
        out["reward_margin"] = margin.mean()
        return self._extras(out, m_err[:b])
