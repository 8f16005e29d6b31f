"""Preference losses on per-sequence log-probabilities.

Every loss here is a small pure function of per-pair tensors (shape ``[B]``: one entry per chosen/rejected pair),
registered by name in :data:`LOSS_FUNCTIONS`. The TRL losses reproduce TRL 1.16
``DPOTrainer._compute_loss`` (``trl/trainer/dpo_trainer.py``) number for number, including its f-divergence scores,
length normalisation (``ipo``, ``sigmoid_norm``), WPO weights, LD-DPO log-probs and mixing by ``loss_weights``.
``simpo`` and ``orpo`` follow their papers (and TRL's experimental CPO/ORPO trainers, which agree with them).

Entry points
------------
- :class:`LossConfig`: frozen, validated on construction (combinations TRL rejects raise ``ValueError``).
- :func:`preference_loss`: per-sequence inputs -> :class:`LossTerms`.
- :func:`preference_loss_from_token_logps`: per-token inputs ``[2B, T]`` (chosen rows first) -> :class:`LossTerms`;
  does the LD-DPO split, the lengths, the unweighted sums and the WPO weights, then calls :func:`preference_loss`.
- :func:`sequence_logps`, :func:`ld_sequence_logps`, :func:`wpo_mean_logps`: the per-token -> per-sequence reductions.

Conventions: ``chosen_logps`` etc. are summed log-probs of the completion tokens (LD-DPO weighted when
``ld_alpha`` is set, per-token means when ``average_log_prob``); ``*_lengths`` are the numbers of completion tokens
(the scored positions, i.e. labels != ignore_index after the shift). ``beta`` is DPO's beta, IPO's tau, SimPO's beta,
and ORPO's lambda (TRL's ORPOTrainer convention).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .sequences import sequence_logps

__all__ = [
    "LossConfig",
    "LossTerms",
    "PairTerms",
    "LOSS_FUNCTIONS",
    "TRL_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "preference_loss",
    "preference_loss_from_token_logps",
    "sequence_logps",
    "ld_sequence_logps",
    "wpo_mean_logps",
    "f_divergence_scores",
]

# --------------------------------------------------------------------------------------------------------------------
# Names and option metadata
# --------------------------------------------------------------------------------------------------------------------

TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
EXTRA_LOSS_TYPES = ("simpo", "orpo")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16: only the losses built on the chosen-rejected score difference accept a non-default f-divergence.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# Losses that never read the reference log-probs.
REFERENCE_FREE_LOSS_TYPES = frozenset({"sft", "simpo", "orpo"})
# Losses that read ``label_smoothing``.
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"robust", "exo_pair", "aot", "aot_unpaired", "simpo"})
# Losses that sort the batch (per-pair weights would be misaligned).
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
# Losses whose gradient w.r.t. one pair's log-probs depends on other pairs' log-probs (batch-wide lengths,
# reference log-probs and detached weights do not count). Every other loss is pair-local: the fused pass
# (fastdpo.fused_pass) forms a group's gradient before the rest of the batch is computed. A new loss that
# couples pairs belongs here; tests/test_fused_pass.py checks the others against the full-batch gradient.
PAIR_COUPLED_LOSS_TYPES = SORTING_LOSS_TYPES
# Losses with a batch-wide term (the token-mean NLL of all chosen completions): pair-local as they stand,
# coupled once WPO's per-pair weights multiply that term (the mean of the weights enters every pair's gradient).
BATCH_TERM_LOSS_TYPES = frozenset({"sft", "orpo"})
# Losses that read the completion lengths.
LENGTH_USING_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm", "sft", "simpo", "orpo"})
# Losses that already normalise by length (``average_log_prob`` would normalise twice).
LENGTH_NORMALISED_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """Options of the preference loss, with TRL 1.16 ``DPOConfig`` names and defaults.

    ``loss_type`` may be a name or a sequence of names; it is stored as a tuple, and ``loss_weights`` as a tuple of
    floats (default 1.0 each). Validation on construction raises ``ValueError`` naming the offending argument.

    Beyond TRL: ``simpo_gamma`` (SimPO's target reward margin gamma, in reward units, as TRL's CPOConfig) and
    ``average_log_prob`` (use per-token mean log-probs instead of sums for the policy and reference sequence
    log-probs, like the ``average_log_prob`` of older TRL / Liger; not with ``ipo``/``sigmoid_norm``/``ld_alpha``),
    and ``cdpo``: apply ``label_smoothing`` to ``'sigmoid'`` as conservative DPO (Mitchell 2023, "A note on DPO with
    noisy preferences"; TRL <= 1.9, FastDPOLoss): -(1 - eps) log sigma(z) - eps log sigma(-z). TRL 1.16's
    ``'sigmoid'`` ignores ``label_smoothing``, which is the default here (``cdpo=False``).
    """

    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    reference_free: bool = False
    use_weighting: bool = False
    ld_alpha: float | None = None
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    average_log_prob: bool = False
    cdpo: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)

        loss_types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        if not loss_types:
            raise ValueError("`loss_type` must name at least one loss.")
        for name in loss_types:
            if name not in LOSS_FUNCTIONS:
                raise ValueError(f"Unknown `loss_type` {name!r}. Should be one of {sorted(LOSS_FUNCTIONS)}.")
        set_("loss_type", loss_types)

        if self.loss_weights is None:
            weights = (1.0,) * len(loss_types)
        else:
            weights = tuple(float(w) for w in self.loss_weights)
            if len(weights) != len(loss_types):
                raise ValueError(
                    "`loss_weights` must have the same length as `loss_type` when combining multiple losses. "
                    f"Got {len(weights)} weights for {len(loss_types)} loss types."
                )
            if not all(math.isfinite(w) for w in weights):
                raise ValueError(f"`loss_weights` must be finite, got {weights}.")
        set_("loss_weights", weights)

        _check_finite("beta", self.beta)
        if self.beta <= 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}.")
        _check_finite("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        _check_finite("simpo_gamma", self.simpo_gamma)
        _check_finite("discopop_tau", self.discopop_tau)
        if self.discopop_tau <= 0:
            raise ValueError(f"`discopop_tau` must be > 0, got {self.discopop_tau}.")

        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"Unknown `f_divergence_type` {self.f_divergence_type!r}. Should be one of {list(F_DIVERGENCE_TYPES)}."
            )
        if self.f_divergence_type != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(
                f"`f_divergence_type={self.f_divergence_type!r}` is only supported for the loss types "
                f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; `loss_type` is {list(loss_types)}. Use the default "
                "`f_divergence_type='reverse_kl'` with these losses."
            )

        ls = self.label_smoothing
        _check_finite("label_smoothing", ls)
        if not 0.0 <= ls <= 1.0:
            raise ValueError(f"`label_smoothing` must lie in [0, 1], got {ls}.")
        if "robust" in loss_types and not ls < 0.5:
            # TRL only warns; at 0.5 the robust loss divides by zero and above it the objective flips sign.
            raise ValueError(f"`label_smoothing` must lie in [0.0, 0.5) for the 'robust' loss, got {ls}.")
        if "exo_pair" in loss_types and not 0.0 < ls < 1.0:
            raise ValueError(
                f"`label_smoothing` must lie in (0, 1) for the 'exo_pair' loss (the EXO paper recommends 1e-3), "
                f"got {ls}."
            )
        if self.cdpo and "sigmoid" in loss_types and ls > 0.5:
            raise ValueError(f"`label_smoothing` must lie in [0, 0.5] for conservative DPO (`cdpo=True`), got {ls}.")
        uses_ls = set(loss_types) & LABEL_SMOOTHING_LOSS_TYPES or (self.cdpo and "sigmoid" in loss_types)
        if ls > 0 and not uses_ls:
            warnings.warn(
                f"`label_smoothing={ls}` has no effect on `loss_type` {list(loss_types)}: as in TRL 1.16, only "
                f"{sorted(LABEL_SMOOTHING_LOSS_TYPES)} read it (TRL 1.16's 'sigmoid' ignores it; pass `cdpo=True` for "
                "conservative DPO, or use 'robust').",
                stacklevel=3,
            )

        if self.use_weighting and set(loss_types) & SORTING_LOSS_TYPES:
            raise ValueError(
                "`use_weighting=True` (WPO) is not supported with 'aot' or 'aot_unpaired' in `loss_type`: those losses "
                "sort the batch, which would misalign the per-pair weights."
            )

        if self.ld_alpha is not None:
            _check_finite("ld_alpha", self.ld_alpha)
            if not 0.0 <= self.ld_alpha <= 1.0:
                raise ValueError(f"`ld_alpha` must lie in [0.0, 1.0], got {self.ld_alpha}.")
        if self.average_log_prob:
            if set(loss_types) & LENGTH_NORMALISED_LOSS_TYPES:
                raise ValueError(
                    "`average_log_prob=True` cannot be combined with 'ipo' or 'sigmoid_norm' in `loss_type`: they "
                    "already normalise by length."
                )
            if self.ld_alpha is not None:
                raise ValueError("`average_log_prob=True` cannot be combined with `ld_alpha`.")

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs must be supplied."""
        return not self.reference_free and not set(self.loss_type) <= REFERENCE_FREE_LOSS_TYPES

    @property
    def pair_local(self) -> bool:
        """Whether each pair's gradient depends on its own log-probs alone (see PAIR_COUPLED_LOSS_TYPES)."""
        names = set(self.loss_type)
        return not (names & PAIR_COUPLED_LOSS_TYPES or (self.use_weighting and names & BATCH_TERM_LOSS_TYPES))

    @property
    def needs_log_sum_sq_probs(self) -> bool:
        """Whether per-token ``log_sum_sq_probs`` (``linear_logprobs(..., with_stats=True)``) are needed (WPO)."""
        return self.use_weighting

    @property
    def needs_token_logps(self) -> bool:
        """Whether per-sequence sums are not enough (LD-DPO needs the per-token split, also for the reference)."""
        return self.ld_alpha is not None

    @classmethod
    def from_trl(cls, args, **overrides) -> "LossConfig":
        """Build from a TRL ``DPOConfig`` (or any object with its attribute names)."""
        kwargs = dict(
            loss_type=getattr(args, "loss_type", "sigmoid"),
            loss_weights=getattr(args, "loss_weights", None),
            beta=getattr(args, "beta", 0.1),
            label_smoothing=getattr(args, "label_smoothing", 0.0),
            f_divergence_type=str(getattr(getattr(args, "f_divergence_type", "reverse_kl"), "value",
                                          getattr(args, "f_divergence_type", "reverse_kl"))),
            f_alpha_divergence_coef=getattr(args, "f_alpha_divergence_coef", 0.5),
            reference_free=getattr(args, "reference_free", False),
            use_weighting=getattr(args, "use_weighting", False),
            ld_alpha=getattr(args, "ld_alpha", None),
            discopop_tau=getattr(args, "discopop_tau", 0.05),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def _check_finite(name: str, value) -> None:
    try:
        ok = math.isfinite(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.") from None
    if not ok:
        raise ValueError(f"`{name}` must be finite, got {value}.")


# --------------------------------------------------------------------------------------------------------------------
# Per-token -> per-sequence reductions
# --------------------------------------------------------------------------------------------------------------------


def ld_sequence_logps(token_logps: Tensor, mask: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO sequence log-probs (Liu et al. 2024, "Length Desensitization in Directed Preference Optimization",
    arXiv:2409.06411, the length-desensitised log-likelihood): log p = sum_{t <= l_p} log p_t + alpha * sum_{t > l_p} log p_t.

    ``token_logps``/``mask`` are ``[2B, T]`` with the ``B`` chosen rows first. ``l_p = min(|y_w|, |y_l|)`` is the
    shared length of each pair; positions are counted over the completion tokens only (``mask.cumsum``), exactly as
    TRL 1.16 does. Apply the same function to the reference per-token log-probs.
    """
    m = mask.to(torch.long)
    pos = m.cumsum(dim=-1)
    lengths = m.sum(dim=-1)
    chosen_len, rejected_len = lengths.chunk(2, dim=0)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(-1)
    shared_mask = mask.bool() & (pos <= shared)
    tail_mask = mask.bool() & (pos > shared)
    return sequence_logps(token_logps, shared_mask) + ld_alpha * sequence_logps(token_logps, tail_mask)


def wpo_mean_logps(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """WPO's length-normalised aligned log-prob of each sequence (Zhou et al. 2024, "WPO: Enhancing RLHF with
    Weighted Preference Optimization", arXiv:2406.11827, Eq. 2 with the sampling-aligned normalisation):
    ``mean_t [log p(y_t) - log sum_v p(v)^2]`` over completion tokens; the pair weight is
    ``exp(chosen) * exp(rejected)``. Detached (TRL computes it under ``no_grad``). ``[S, T] -> [S]``.
    """
    with torch.no_grad():
        lengths = mask.sum(-1).clamp(min=1).to(token_logps.dtype)
        aligned = token_logps.detach() - log_sum_sq_probs.to(token_logps.dtype)
        return sequence_logps(aligned, mask) / lengths


# --------------------------------------------------------------------------------------------------------------------
# f-divergence (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
# Divergence Constraints", arXiv:2309.16240, Table 1 / Theorem 1: the implicit reward is beta * f'(pi/pi_ref)).
# --------------------------------------------------------------------------------------------------------------------


def f_divergence_scores(logratios: Tensor, f_divergence_type: str, alpha: float = 0.5) -> Tensor:
    """f'(u) at u = pi/pi_ref = exp(logratios): reverse_kl log u; forward_kl 1 - 1/u; js_divergence
    log(2u/(1+u)) = log 2 + logsigmoid(log u); alpha_divergence (u^(alpha-1) - 1)/(alpha - 1) (-> log u at alpha=1),
    with TRL's clamp of the exponent (80, or 11 for fp16)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        dtype = t.dtype
        work = t.float() if dtype in (torch.float16, torch.bfloat16) else t
        t_clamped = torch.clamp(work, max=11.0 if dtype == torch.float16 else 80.0)
        return (torch.exp(t_clamped) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"Unknown `f_divergence_type` {f_divergence_type!r}.")


# --------------------------------------------------------------------------------------------------------------------
# The losses: each (PairTerms, LossConfig) -> per-pair loss [B]
# --------------------------------------------------------------------------------------------------------------------


class PairTerms(NamedTuple):
    """Per-pair quantities every loss may read (all ``[B]``)."""

    chosen_logps: Tensor  # policy sequence log-probs (LD-weighted / averaged as configured)
    rejected_logps: Tensor
    ref_chosen_logps: Tensor  # zeros when reference-free
    ref_rejected_logps: Tensor
    chosen_logratios: Tensor  # logps - ref_logps
    rejected_logratios: Tensor
    chosen_scores: Tensor  # f'(pi/pi_ref) (= logratios for reverse KL)
    rejected_scores: Tensor
    chosen_lengths: Tensor  # completion token counts, float, clamped >= 1
    rejected_lengths: Tensor
    chosen_sum_logps: Tensor  # unweighted sums of completion token log-probs (SFT / SimPO / ORPO)
    rejected_sum_logps: Tensor

    @property
    def delta_score(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores

    @property
    def delta_score_per_token(self) -> Tensor:
        """s_w/|y_w| - s_l/|y_l|: the length-normalised score difference (IPO, length-normalised DPO)."""
        return self.chosen_scores / self.chosen_lengths - self.rejected_scores / self.rejected_lengths


def sigmoid_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7): -log sigma(beta * (s_w - s_l)), s = f-divergence score
    (log-ratio for reverse KL). Like TRL 1.16 it ignores ``label_smoothing`` unless ``cdpo=True`` (conservative DPO,
    Mitchell 2023: -(1 - eps) log sigma(z) - eps log sigma(-z), as TRL <= 1.9)."""
    if c.cdpo:
        return _smoothed_logistic(c.beta * p.delta_score, c.label_smoothing)
    return -F.logsigmoid(c.beta * p.delta_score)


def hinge_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """SLiC-HF calibration hinge (Zhao et al. 2023, arXiv:2305.10425, rank calibration loss, margin 1; as in RSO, Liu et al. 2023,
    arXiv:2309.06657): max(0, 1 - beta * (s_w - s_l))."""
    return torch.relu(1 - c.beta * p.delta_score)


def ipo_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17, beta = tau): (s_w/|y_w| - s_l/|y_l| - 1/(2 tau))^2, with
    TRL's per-token normalisation of the scores (confirmed with the IPO authors, per TRL)."""
    return (p.delta_score_per_token - 1 / (2 * c.beta)) ** 2


def exo_pair_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of LM Alignment", arXiv:2402.00856, Eq. 16,
    K = 2): KL(q || p_eps) with q = softmax(beta * s) over {w, l} and p_eps = (1 - eps, eps), eps = label_smoothing."""
    z = c.beta * p.delta_score
    eps = c.label_smoothing
    qw, log_qw = torch.sigmoid(z), F.logsigmoid(z)
    ql, log_ql = torch.sigmoid(-z), F.logsigmoid(-z)
    return qw * (log_qw - math.log1p(-eps)) + ql * (log_ql - math.log(eps))


def nca_pair_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """NCA pairwise (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv:2402.05369, NCA loss for K = 2 pairwise data): -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l),
    r = beta * log(pi/pi_ref)."""
    rw, rl = c.beta * p.chosen_logratios, c.beta * p.rejected_logratios
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def robust_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, the de-biased rDPO loss, flip rate eps =
    label_smoothing): ((1 - eps) l(z) - eps l(-z)) / (1 - 2 eps) with l(z) = -log sigma(z), z = beta (s_w - s_l)."""
    z = c.beta * p.delta_score
    eps = c.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def bco_pair_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment", arXiv:2404.04656):
    -log sigma(r_w) - log sigma(-r_l), r = beta * log(pi/pi_ref). TRL 1.16 uses no reward shift delta (no running
    mean), so neither does this: the function is stateless."""
    rw, rl = c.beta * p.chosen_logratios, c.beta * p.rejected_logratios
    return -F.logsigmoid(rw) - F.logsigmoid(-rl)


def sppo_hard_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """SPPO, hard-probability version (Wu et al. 2024, "Self-Play Preference Optimization", arXiv:2405.00675,
    Eq. 4.7 / Algorithm 1 with P = 1 for the winner, 0 for the loser):
    (log(pi/pi_ref)_w - 1/(2 beta))^2 + (log(pi/pi_ref)_l + 1/(2 beta))^2."""
    return (p.chosen_logratios - 0.5 / c.beta) ** 2 + (p.rejected_logratios + 0.5 / c.beta) ** 2


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z) (conservative-DPO / SimPO label smoothing)."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def aot_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """AOT paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882, the paired first-order stochastic dominance loss with a logistic surrogate): sort the batch's
    policy log-ratios log pi_w - log pi_l and the reference's independently, and apply the smoothed logistic loss to
    the differences of the sorted values. Output order is the sorted order, not the pair order."""
    logratios, _ = torch.sort(p.chosen_logps - p.rejected_logps, dim=0)
    ref_logratios, _ = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0)
    return _smoothed_logistic(c.beta * (logratios - ref_logratios), c.label_smoothing)


def aot_unpaired_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """AOT unpaired (Melnyk et al. 2024, arXiv:2406.05882, unpaired dominance of chosen over rejected rewards):
    sort chosen and rejected log(pi/pi_ref) independently; smoothed logistic loss of the sorted differences."""
    chosen_sorted, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_logistic(c.beta * (chosen_sorted - rejected_sorted), c.label_smoothing)


def apo_zero_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266, Eq. 7): 1 - sigma(r_w) + sigma(r_l), r = beta * log(pi/pi_ref)."""
    return 1 - torch.sigmoid(c.beta * p.chosen_logratios) + torch.sigmoid(c.beta * p.rejected_logratios)


def apo_down_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8): sigma(r_w) + 1 - sigma(r_w - r_l)."""
    rw = c.beta * p.chosen_logratios
    return torch.sigmoid(rw) + (1 - torch.sigmoid(c.beta * (p.chosen_logratios - p.rejected_logratios)))


def discopop_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms
    with and for LLMs", arXiv:2406.08414, Eq. 5): with rho = beta (s_w - s_l) and m = sigma(rho / tau),
    (1 - m) * (-log sigma(rho)) + m * exp(-rho); tau = discopop_tau."""
    rho = c.beta * p.delta_score
    m = torch.sigmoid(rho / c.discopop_tau)
    return -F.logsigmoid(rho) * (1 - m) + torch.exp(-rho) * m


def _chosen_nll(p: PairTerms) -> Tensor:
    """Token-mean NLL of the batch's chosen completions, broadcast to [B] (TRL's ``sft`` term)."""
    nll = -p.chosen_sum_logps.sum() / p.chosen_lengths.sum().clamp(min=1)
    return nll.expand(p.chosen_sum_logps.shape[0])


def sft_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """SFT / NLL term on the chosen completions (as mixed into DPO by RPO, Pang et al. 2024, arXiv:2404.19733,
    and MPO): -sum_{batch, t} log pi(y_w,t) / (number of chosen tokens), the same for every pair. Uses the
    raw token log-probs (not LD-DPO weighted), like TRL."""
    return _chosen_nll(p)


def sigmoid_norm_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """Length-normalised DPO (as in Tulu 3, Lambert et al. 2024, arXiv:2411.15124, length-normalised DPO
    objective; SimPO-style normalisation with a reference): -log sigma(beta (s_w/|y_w| - s_l/|y_l|))."""
    return -F.logsigmoid(c.beta * p.delta_score_per_token)


def simpo_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, Eq. 6): -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), with the label
    smoothing of the paper's code: -(1-eps) log sigma(z) - eps log sigma(-z). Reference-free; gamma = simpo_gamma."""
    z = c.beta * (p.chosen_sum_logps / p.chosen_lengths - p.rejected_sum_logps / p.rejected_lengths) - c.simpo_gamma
    return _smoothed_logistic(z, c.label_smoothing)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(p: PairTerms, c: LossConfig) -> Tensor:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691, Eqs. 6-7): L_SFT + lambda * L_OR with L_OR = -log sigma(log odds(y_w) - log odds(y_l)),
    odds(y) = P(y)/(1 - P(y)), log P(y) = the length-normalised log-prob (Eq. 4); L_SFT the token-mean NLL of the
    chosen completions; lambda = beta (TRL's ORPOTrainer convention). Reference-free."""
    lc = p.chosen_sum_logps / p.chosen_lengths
    lr = p.rejected_sum_logps / p.rejected_lengths
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))
    return _chosen_nll(p) - c.beta * F.logsigmoid(log_odds)


LossFn = Callable[[PairTerms, LossConfig], Tensor]

LOSS_FUNCTIONS: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LossTerms:
    """Result of :func:`preference_loss`. Everything except ``loss`` and ``per_pair_losses`` is detached."""

    loss: Tensor  # scalar: sum_k w_k * mean(per-pair loss_k)
    per_pair_losses: Tensor  # [B]: sum_k w_k * loss_k (WPO-weighted); loss == per_pair_losses.mean()
    chosen_rewards: Tensor  # [B]: beta * (logps - ref_logps); SimPO/ORPO-only mixes: beta * mean token log-prob
    rejected_rewards: Tensor
    reward_margins: Tensor  # [B]
    reward_accuracies: Tensor  # [B] float (chosen_rewards > rejected_rewards)
    chosen_logps: Tensor  # [B] policy sequence log-probs as used by the losses
    rejected_logps: Tensor
    losses_by_type: dict[str, Tensor] = field(default_factory=dict)  # detached scalar mean per loss type (unweighted)
    wpo_weights: Tensor | None = None  # [B] exp(wpo_c) * exp(wpo_r) when use_weighting


def preference_loss(
    config: LossConfig,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    chosen_sum_logps: Tensor | None = None,
    rejected_sum_logps: Tensor | None = None,
    chosen_wpo_logps: Tensor | None = None,
    rejected_wpo_logps: Tensor | None = None,
) -> LossTerms:
    """Combined preference loss from per-sequence tensors (all ``[B]``).

    Args:
        chosen_logps, rejected_logps: policy sequence log-probs, differentiable; summed over completion tokens,
            LD-DPO weighted if ``config.ld_alpha`` is set (see :func:`ld_sequence_logps`), per-token means if
            ``config.average_log_prob``.
        ref_chosen_logps, ref_rejected_logps: reference log-probs, reduced the same way; required when
            ``config.needs_reference``; ignored (treated as 0) when ``config.reference_free``.
        chosen_lengths, rejected_lengths: completion token counts (clamped to >= 1); required by ipo, sigmoid_norm,
            sft, simpo, orpo.
        chosen_sum_logps, rejected_sum_logps: unweighted sums of completion token log-probs (differentiable); only
            differ from ``chosen_logps`` with ``ld_alpha``/``average_log_prob``. Default: ``chosen_logps`` (times the
            length with ``average_log_prob``). Needed by sft, simpo, orpo when ``ld_alpha`` is set.
        chosen_wpo_logps, rejected_wpo_logps: :func:`wpo_mean_logps` of each sequence; required with
            ``config.use_weighting``.
    """
    c = config
    names = c.loss_type
    if chosen_logps.shape != rejected_logps.shape or chosen_logps.dim() != 1:
        raise ValueError(
            f"`chosen_logps` and `rejected_logps` must both be [B]; got {tuple(chosen_logps.shape)} and "
            f"{tuple(rejected_logps.shape)}."
        )
    zeros = torch.zeros_like(chosen_logps)
    if c.reference_free or not c.needs_reference:
        ref_c = zeros if (c.reference_free or ref_chosen_logps is None) else ref_chosen_logps
        ref_r = zeros if (c.reference_free or ref_rejected_logps is None) else ref_rejected_logps
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(
                f"`ref_chosen_logps` and `ref_rejected_logps` are required for `loss_type` {list(names)} unless "
                "`reference_free=True`."
            )
        ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
    ref_c = ref_c.detach().to(chosen_logps.dtype)
    ref_r = ref_r.detach().to(chosen_logps.dtype)

    if chosen_lengths is None or rejected_lengths is None:
        if set(names) & LENGTH_USING_LOSS_TYPES:
            raise ValueError(f"`chosen_lengths` and `rejected_lengths` are required for `loss_type` {list(names)}.")
        len_c = len_r = torch.ones_like(chosen_logps)
    else:
        len_c = chosen_lengths.to(chosen_logps.dtype).clamp(min=1)
        len_r = rejected_lengths.to(chosen_logps.dtype).clamp(min=1)

    if chosen_sum_logps is None or rejected_sum_logps is None:
        if c.ld_alpha is not None and set(names) & {"sft", "simpo", "orpo"}:
            raise ValueError(
                "`chosen_sum_logps` and `rejected_sum_logps` (unweighted sums) are required for 'sft', 'simpo' or "
                "'orpo' with `ld_alpha`."
            )
        scale_c, scale_r = (len_c, len_r) if c.average_log_prob else (1.0, 1.0)
        sum_c, sum_r = chosen_logps * scale_c, rejected_logps * scale_r
    else:
        sum_c, sum_r = chosen_sum_logps, rejected_sum_logps

    chosen_logratios = chosen_logps - ref_c
    rejected_logratios = rejected_logps - ref_r
    p = PairTerms(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(chosen_logratios, c.f_divergence_type, c.f_alpha_divergence_coef),
        rejected_scores=f_divergence_scores(rejected_logratios, c.f_divergence_type, c.f_alpha_divergence_coef),
        chosen_lengths=len_c,
        rejected_lengths=len_r,
        chosen_sum_logps=sum_c,
        rejected_sum_logps=sum_r,
    )

    weights = None
    if c.use_weighting:
        if chosen_wpo_logps is None or rejected_wpo_logps is None:
            raise ValueError(
                "`chosen_wpo_logps` and `rejected_wpo_logps` are required with `use_weighting=True` (see "
                "`wpo_mean_logps`; they need per-token `log_sum_sq_probs`)."
            )
        weights = (torch.exp(chosen_wpo_logps.detach()) * torch.exp(rejected_wpo_logps.detach())).to(
            chosen_logps.dtype
        )

    per_pair = None
    by_type: dict[str, Tensor] = {}
    for name, w in zip(names, c.loss_weights):
        term = LOSS_FUNCTIONS[name](p, c)
        if weights is not None:
            term = term * weights
        by_type[name] = term.detach().mean()
        per_pair = term * w if per_pair is None else per_pair + term * w

    if set(names) <= {"simpo", "orpo"}:
        # Reference-free preference losses: their implicit reward is beta * mean token log-prob (SimPO Eq. 4).
        chosen_rewards = c.beta * (sum_c / len_c).detach()
        rejected_rewards = c.beta * (sum_r / len_r).detach()
    else:
        chosen_rewards = c.beta * chosen_logratios.detach()
        rejected_rewards = c.beta * rejected_logratios.detach()
    return LossTerms(
        loss=per_pair.mean(),
        per_pair_losses=per_pair,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_margins=chosen_rewards - rejected_rewards,
        reward_accuracies=(chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
        losses_by_type=by_type,
        wpo_weights=weights,
    )


def preference_loss_from_token_logps(
    config: LossConfig,
    token_logps: Tensor,
    mask: Tensor,
    *,
    ref_token_logps: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    log_sum_sq_probs: Tensor | None = None,
) -> LossTerms:
    """Combined preference loss from per-token tensors.

    Args:
        token_logps: ``[2B, T]`` policy log-probs of the (already shifted) targets, chosen rows first, 0 or anything
            at masked positions; differentiable (``fastdpo.linear_logprobs`` output).
        mask: ``[2B, T]`` bool, True at completion tokens (``targets != ignore_index``).
        ref_token_logps: ``[2B, T]`` reference per-token log-probs (same mask), or instead
        ref_chosen_logps, ref_rejected_logps: ``[B]`` precomputed reference sequence log-probs, already reduced like
            the policy's (LD-DPO weighted if ``ld_alpha``; per-token means if ``average_log_prob``).
        log_sum_sq_probs: ``[2B, T]`` per-token log sum_v p_v^2 of the policy (``TokenStats.log_sum_sq_probs``);
            required with ``use_weighting``.
    """
    c = config
    if token_logps.dim() != 2 or token_logps.shape != mask.shape or token_logps.shape[0] % 2:
        raise ValueError(
            f"`token_logps` and `mask` must both be [2B, T]; got {tuple(token_logps.shape)} and {tuple(mask.shape)}."
        )
    mask = mask.bool()
    lengths = mask.sum(-1)
    sums = sequence_logps(token_logps, mask)

    def reduce(x: Tensor, plain_sums: Tensor | None = None) -> Tensor:
        if c.ld_alpha is not None:
            return ld_sequence_logps(x, mask, c.ld_alpha)
        s = sequence_logps(x, mask) if plain_sums is None else plain_sums
        return s / lengths.clamp(min=1).to(s.dtype) if c.average_log_prob else s

    logps = reduce(token_logps, sums)
    if ref_token_logps is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("Pass either `ref_token_logps` or `ref_chosen_logps`/`ref_rejected_logps`, not both.")
        if ref_token_logps.shape != token_logps.shape:
            raise ValueError(
                f"`ref_token_logps` must be shaped like `token_logps` {tuple(token_logps.shape)}, got "
                f"{tuple(ref_token_logps.shape)}."
            )
        ref_chosen_logps, ref_rejected_logps = reduce(ref_token_logps.detach()).chunk(2, dim=0)

    wpo_c = wpo_r = None
    if c.use_weighting:
        if log_sum_sq_probs is None:
            raise ValueError("`log_sum_sq_probs` is required with `use_weighting=True`.")
        wpo_c, wpo_r = wpo_mean_logps(token_logps, log_sum_sq_probs, mask).chunk(2, dim=0)

    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
    chosen_sum, rejected_sum = sums.chunk(2, dim=0)
    return preference_loss(
        c,
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        chosen_sum_logps=chosen_sum,
        rejected_sum_logps=rejected_sum,
        chosen_wpo_logps=wpo_c,
        rejected_wpo_logps=wpo_r,
    )
