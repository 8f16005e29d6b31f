"""fastdpo.losses against TRL 1.16's own DPOTrainer._compute_loss, plus float64 restatements.

The TRL comparison builds one tiny DPOTrainer (random Llama, WordLevel tokenizer, 8 preference pairs, a perturbed
reference model), switches the attributes `_compute_loss` reads at call time, and compares TRL's loss and its
gradients (LM head and input embeddings) with fastdpo.losses applied to per-token log-probs recomputed naively in
float64 from the same model's hidden states.
"""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_models import cpu_dpo_config, offline_env, perturbed_copy, tiny_llama, tiny_preference_dataset, tiny_tokenizer  # noqa: E402

offline_env()

from fastdpo import losses as L  # noqa: E402

LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-4  # relative L2 error of the whole gradient tensor


# ----------------------------------------------------------------------------------------------------------------
# TRL harness
# ----------------------------------------------------------------------------------------------------------------


class Harness:
    def __init__(self, tmp_dir: str):
        from trl import DPOTrainer

        torch.set_num_threads(min(2, torch.get_num_threads()))
        self.tok = tiny_tokenizer()
        model = tiny_llama(0)
        ref = perturbed_copy(model, scale=0.05, seed=1)
        args = cpu_dpo_config(
            output_dir=tmp_dir,
            per_device_train_batch_size=8,
            max_length=None,
            use_weighting=True,  # so the fused head also emits log_sum_sq_probs; toggled per case below
            dataset_num_proc=None,
        )
        self.trainer = DPOTrainer(
            model=model, ref_model=ref, args=args, train_dataset=tiny_preference_dataset(8), processing_class=self.tok
        )
        self.model = self.trainer.model
        self.ref_model = self.trainer.ref_model
        ds = self.trainer.train_dataset
        self.batch = self.trainer.data_collator([ds[i] for i in range(len(ds))])
        self.model.train()
        self.ref_model.eval()
        from accelerate.state import AcceleratorState, GradientState, PartialState

        self._accelerate_state = [(c._shared_state, dict(c._shared_state))
                                  for c in (PartialState, AcceleratorState, GradientState)]

    # -- TRL side -------------------------------------------------------------------------------------------------
    def _ensure_accelerate_state(self):
        """Constructing any TrainingArguments (e.g. another DPOConfig in a later test) clears accelerate's global
        (Borg) state, which the trainer's Accelerator reads at compute time; put this trainer's state back."""
        from accelerate.state import AcceleratorState, GradientState, PartialState

        for cls, saved in zip((PartialState, AcceleratorState, GradientState), self._accelerate_state):
            if cls._shared_state is not saved[0] or cls._shared_state != saved[1]:
                cls._shared_state.clear()
                cls._shared_state.update(saved[1])

    def trl(self, opts: dict, ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None):
        self._ensure_accelerate_state()
        tr = self.trainer
        loss_type = opts.get("loss_type", "sigmoid")
        tr.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        tr.loss_weights = list(opts.get("loss_weights") or [1.0] * len(tr.loss_types))
        tr.beta = opts.get("beta", 0.1)
        tr.label_smoothing = opts.get("label_smoothing", 0.0)
        tr.f_divergence_type = opts.get("f_divergence_type", "reverse_kl")
        tr.f_alpha_divergence_coef = opts.get("f_alpha_divergence_coef", 0.5)
        tr.use_weighting = opts.get("use_weighting", False)
        tr.ld_alpha = opts.get("ld_alpha", None)
        tr.args.discopop_tau = opts.get("discopop_tau", 0.05)
        batch = dict(self.batch)
        tr.precompute_ref_logps = ref_logps is not None
        if ref_logps is not None:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_logps
        self.model.zero_grad(set_to_none=True)
        loss = tr.compute_loss(self.model, batch)
        loss.backward()
        return loss.detach().double(), self._grads()

    def _grads(self):
        return (
            self.model.lm_head.weight.grad.detach().double().clone(),
            self.model.model.embed_tokens.weight.grad.detach().double().clone(),
        )

    # -- naive float64 side ---------------------------------------------------------------------------------------
    def token_stats(self, model, grad: bool):
        b = self.batch
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            hidden = hidden.last_hidden_state[:, :-1]
            logits = hidden.double() @ model.lm_head.weight.double().T
            logp_all = torch.log_softmax(logits, dim=-1)
            targets = b["input_ids"][:, 1:]
            token_logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            log_sum_sq = torch.logsumexp(2 * logp_all.detach(), dim=-1)
        mask = b["completion_mask"][:, 1:].bool()
        return token_logps, mask, log_sum_sq

    def ours(self, cfg: L.LossConfig, ref: str = "tokens", ref_logps=None):
        self.model.zero_grad(set_to_none=True)
        token_logps, mask, lssp = self.token_stats(self.model, grad=True)
        kwargs = {}
        if ref == "tokens":
            kwargs["ref_token_logps"], _, _ = self.token_stats(self.ref_model, grad=False)
        elif ref == "sequences":
            kwargs["ref_chosen_logps"], kwargs["ref_rejected_logps"] = (x.double() for x in ref_logps)
        out = L.preference_loss_from_token_logps(
            cfg, token_logps, mask, log_sum_sq_probs=lssp if cfg.use_weighting else None, **kwargs
        )
        out.loss.backward()
        return out, self._grads()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    pytest.importorskip("trl")
    return Harness(str(tmp_path_factory.mktemp("trl_out")))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _assert_matches(harness, opts, cfg=None, ref="tokens", ref_logps=None):
    cfg = cfg or L.LossConfig(**opts)
    trl_loss, (trl_gw, trl_ge) = harness.trl(opts, ref_logps=ref_logps)
    out, (gw, ge) = harness.ours(cfg, ref=ref, ref_logps=ref_logps)
    assert math.isfinite(float(trl_loss))
    got = float(out.loss.detach())
    assert got == pytest.approx(float(trl_loss), rel=LOSS_RTOL, abs=1e-7), (opts, got, float(trl_loss))
    assert float(trl_gw.norm()) > 0 and float(trl_ge.norm()) > 0
    assert _rel(gw, trl_gw) < GRAD_RTOL, ("lm_head grad", opts, _rel(gw, trl_gw))
    assert _rel(ge, trl_ge) < GRAD_RTOL, ("embedding grad", opts, _rel(ge, trl_ge))
    # Logged rewards: TRL logs beta * logratios, the same quantities.
    assert out.chosen_rewards.shape == out.rejected_rewards.shape == (harness.batch["input_ids"].shape[0] // 2,)
    return out, trl_loss


TRL_CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", beta=0.5),
    dict(loss_type="hinge"),
    dict(loss_type="hinge", beta=0.3),
    dict(loss_type="ipo"),
    dict(loss_type="ipo", beta=2.0),
    dict(loss_type="exo_pair", label_smoothing=1e-3),
    dict(loss_type="exo_pair", label_smoothing=0.2, beta=0.5),
    dict(loss_type="nca_pair"),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="robust", label_smoothing=0.0),
    dict(loss_type="bco_pair"),
    dict(loss_type="sppo_hard"),
    dict(loss_type="aot"),
    dict(loss_type="aot", label_smoothing=0.1, beta=0.5),
    dict(loss_type="aot_unpaired", label_smoothing=0.1),
    dict(loss_type="apo_zero"),
    dict(loss_type="apo_down", beta=0.5),
    dict(loss_type="discopop"),
    dict(loss_type="discopop", discopop_tau=0.5, beta=0.3),
    dict(loss_type="sft"),
    dict(loss_type="sigmoid_norm"),
    dict(loss_type="sigmoid_norm", beta=3.0),
    # mixtures (MPO-style and RPO-style)
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["ipo", "sft"]),
    dict(loss_type=["apo_zero", "nca_pair", "sppo_hard"], loss_weights=[1.0, -0.5, 0.01]),
    # f-divergences
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", f_divergence_type="js_divergence", beta=0.5),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
    dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.7),
    dict(loss_type="ipo", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid_norm", f_divergence_type="js_divergence"),
    dict(loss_type="exo_pair", f_divergence_type="js_divergence", label_smoothing=0.01),
    dict(loss_type="robust", f_divergence_type="forward_kl", label_smoothing=0.2),
    dict(loss_type=["discopop", "sft"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    # WPO weighting
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type="ipo", use_weighting=True),
    dict(loss_type=["bco_pair", "apo_down", "exo_pair"], use_weighting=True, label_smoothing=0.05),
    dict(loss_type=["discopop", "sppo_hard", "nca_pair"], use_weighting=True, beta=0.3),
    dict(loss_type=["apo_zero", "robust", "sigmoid_norm"], use_weighting=True, label_smoothing=0.1),
    # LD-DPO
    dict(loss_type="sigmoid", ld_alpha=0.5),
    dict(loss_type="sigmoid", ld_alpha=0.0, beta=0.5),
    dict(loss_type=["ipo", "sft"], ld_alpha=0.3),
    dict(loss_type="aot_unpaired", ld_alpha=0.7),
    dict(loss_type="sigmoid", ld_alpha=0.5, use_weighting=True, f_divergence_type="forward_kl"),
]


def _case_id(opts):
    return "-".join(f"{k}={v}" for k, v in opts.items()).replace(" ", "")


@pytest.mark.parametrize("opts", TRL_CASES, ids=[_case_id(o) for o in TRL_CASES])
def test_matches_trl(harness, opts):
    out, trl_loss = _assert_matches(harness, opts)
    # not at a constant: the perturbed reference makes the rewards non-zero
    assert float(out.chosen_rewards.abs().max()) > 1e-3


def test_harness_losses_not_at_constants(harness):
    """Sanity of the fixture: chosen/rejected lengths differ and log-ratios are O(1), so every loss is informative."""
    tl, mask, _ = harness.token_stats(harness.model, grad=False)
    rl, _, _ = harness.token_stats(harness.ref_model, grad=False)
    lengths = mask.sum(-1)
    lc, lr = lengths.chunk(2)
    assert (lc != lr).sum() >= 4 and (lc > lr).any() and (lc < lr).any()
    logratios = L.sequence_logps(tl - rl, mask)
    assert 0.3 < float(logratios.abs().mean()) < 20


def test_sigmoid_label_smoothing_is_ignored_like_trl(harness):
    opts = dict(loss_type="sigmoid", label_smoothing=0.2)
    with pytest.warns(UserWarning, match="label_smoothing"):
        cfg = L.LossConfig(**opts)
    out, trl_loss = _assert_matches(harness, opts, cfg=cfg)
    plain, _ = harness.ours(L.LossConfig(loss_type="sigmoid"))
    assert float(plain.loss.detach()) == pytest.approx(float(out.loss.detach()), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot", ["apo_zero", "sft"]])
def test_reference_free_matches_trl_with_zero_reference(harness, loss_type):
    """reference_free=True == TRL with precomputed reference log-probs of 0 (the given reference is ignored)."""
    b = harness.batch["input_ids"].shape[0] // 2
    zeros = (torch.zeros(b), torch.zeros(b))
    opts = dict(loss_type=loss_type)
    cfg = L.LossConfig(loss_type=loss_type, reference_free=True)
    trl_loss, (trl_gw, trl_ge) = harness.trl(opts, ref_logps=zeros)
    out, (gw, ge) = harness.ours(cfg, ref="tokens")  # reference supplied but must be ignored
    assert float(out.loss.detach()) == pytest.approx(float(trl_loss), rel=LOSS_RTOL)
    assert _rel(gw, trl_gw) < GRAD_RTOL and _rel(ge, trl_ge) < GRAD_RTOL
    assert torch.allclose(out.chosen_rewards, 0.1 * out.chosen_logps)


@pytest.mark.parametrize("loss_type", ["sigmoid", "aot", "sppo_hard"])
def test_precomputed_reference_matches_trl(harness, loss_type):
    gen = torch.Generator().manual_seed(7)
    b = harness.batch["input_ids"].shape[0] // 2
    ref = (-20 + 5 * torch.randn(b, generator=gen), -20 + 5 * torch.randn(b, generator=gen))
    _assert_matches(harness, dict(loss_type=loss_type, beta=0.05), ref="sequences", ref_logps=ref)


def test_trl_rejects_what_we_reject(harness, tmp_path):
    """The combinations TRL 1.16 rejects at construction are rejected by LossConfig too."""
    from trl import DPOConfig, DPOTrainer

    bad = [
        (dict(loss_type=["sigmoid", "bco_pair"], f_divergence_type="forward_kl"), ValueError),
        (dict(loss_type=["exo_pair"], label_smoothing=0.0), ValueError),
        (dict(loss_type=["aot"], use_weighting=True), NotImplementedError),
    ]
    for opts, trl_exc in bad:
        args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, save_strategy="no", **opts)
        model = tiny_llama(0)
        with pytest.raises(trl_exc):
            DPOTrainer(model=model, ref_model=perturbed_copy(model), args=args,
                       train_dataset=tiny_preference_dataset(2), processing_class=harness.tok)
        with pytest.raises(ValueError):
            L.LossConfig(**opts)
    with pytest.raises(ValueError, match="loss_weights"):
        DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_weights"):
        L.LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0])


# ----------------------------------------------------------------------------------------------------------------
# Unit tests without TRL: SimPO, ORPO, edge semantics, validation
# ----------------------------------------------------------------------------------------------------------------


def _random_pairs(b=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    len_c = torch.randint(1, 12, (b,), generator=gen)
    len_r = torch.randint(1, 12, (b,), generator=gen)
    # sequence log-probs ~ length * mean token log-prob in (-3, -0.05)
    lc = -(len_c * (0.05 + 3 * torch.rand(b, generator=gen))).to(dtype)
    lr = -(len_r * (0.05 + 3 * torch.rand(b, generator=gen))).to(dtype)
    return lc.requires_grad_(), lr.requires_grad_(), len_c, len_r


@pytest.mark.parametrize("beta,gamma,ls", [(2.0, 1.0, 0.0), (2.5, 0.3, 0.1), (0.1, 0.0, 0.0)])
def test_simpo_matches_paper(beta, gamma, ls):
    lc, lr, len_c, len_r = _random_pairs()
    cfg = L.LossConfig(loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=ls)
    out = L.preference_loss(cfg, lc, lr, None, None, len_c, len_r)
    # SimPO Eq. 6, with the label smoothing of princeton-nlp/SimPO's trainer
    z = beta * lc / len_c - beta * lr / len_r - gamma
    want = (-(1 - ls) * torch.log(torch.sigmoid(z)) - ls * torch.log(torch.sigmoid(-z))).mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(out.loss, (lc, lr), retain_graph=True)
    g_want = torch.autograd.grad(want, (lc, lr))
    for a, b in zip(g_ours, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * lc.detach() / len_c)
    assert not cfg.needs_reference


def test_simpo_matches_trl_cpo_trainer():
    """Cross-check with TRL's experimental CPOTrainer.cpo_loss(loss_type='simpo') on averaged log-probs."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    lc, lr, len_c, len_r = _random_pairs(seed=3)
    fake = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.05,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, cr, rr = cpo.CPOTrainer.cpo_loss(fake, lc / len_c, lr / len_r)
    cfg = L.LossConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.05)
    out = L.preference_loss(cfg, lc, lr, None, None, len_c, len_r)
    torch.testing.assert_close(out.per_pair_losses, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, cr)


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_matches_paper(beta):
    lc, lr, len_c, len_r = _random_pairs(seed=1)
    cfg = L.LossConfig(loss_type="orpo", beta=beta)
    out = L.preference_loss(cfg, lc, lr, None, None, len_c, len_r)
    # ORPO Eqs. 4, 6, 7 in float64, directly: P = exp(mean token log-prob), odds = P / (1 - P)
    pc, pr = torch.exp(lc / len_c), torch.exp(lr / len_r)
    log_or = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    l_or = -torch.log(torch.sigmoid(log_or))
    l_sft = -lc.sum() / len_c.sum()
    want = l_sft + beta * l_or.mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad(out.loss, (lc, lr), retain_graph=True)
    g_want = torch.autograd.grad(want, (lc, lr))
    for a, b in zip(g_ours, g_want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_orpo_odds_ratio_matches_trl_orpo_trainer():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    lc, lr, len_c, len_r = _random_pairs(seed=5)
    # include a near-zero mean log-prob, where the stable log1mexp matters
    with torch.no_grad():
        lc[0] = -1e-4 * len_c[0]
    fake = types.SimpleNamespace(beta=0.3, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    or_losses, cr, rr, _, _ = orpo.ORPOTrainer.odds_ratio_loss(fake, lc / len_c, lr / len_r)
    cfg = L.LossConfig(loss_type="orpo", beta=0.3)
    out = L.preference_loss(cfg, lc, lr, None, None, len_c, len_r)
    nll = -lc.sum() / len_c.sum()
    # TRL's ORPOTrainer: loss = nll - mean(beta * logsigmoid(log_odds)); float32 inside TRL
    torch.testing.assert_close(out.per_pair_losses.float(), (nll - or_losses).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards.float(), cr.float(), rtol=1e-6, atol=1e-7)


def test_orpo_simpo_from_tokens_use_token_means_and_ignore_reference():
    gen = torch.Generator().manual_seed(2)
    tl = -torch.rand(6, 9, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(6, 9, generator=gen) > 0.3
    mask[:, 0] = True
    for lt in ("orpo", "simpo", ["simpo", "orpo"]):
        cfg = L.LossConfig(loss_type=lt, beta=0.5)
        a = L.preference_loss_from_token_logps(cfg, tl, mask)
        b = L.preference_loss_from_token_logps(cfg, tl, mask, ref_token_logps=torch.randn(6, 9, dtype=torch.float64))
        torch.testing.assert_close(a.loss, b.loss)
        s, n = (tl * mask).sum(-1), mask.sum(-1)
        c = L.preference_loss(cfg, s[:3], s[3:], None, None, n[:3], n[3:])
        torch.testing.assert_close(a.loss, c.loss)
        # LD-DPO changes the DPO log-probs but not the token means SimPO/ORPO use
        d = L.preference_loss_from_token_logps(L.LossConfig(loss_type=lt, beta=0.5, ld_alpha=0.2), tl, mask)
        torch.testing.assert_close(a.loss, d.loss)


def _float64_trl_restatement(opts, lc, lr, rc, rr, len_c, len_r):
    """Independent float64 restatement of a few TRL formulas (sigmoid, ipo, bco_pair) for the sequence API."""
    beta = opts.get("beta", 0.1)
    dc, dr = lc - rc, lr - rr
    lt = opts["loss_type"]
    if lt == "sigmoid":
        return -torch.log(torch.sigmoid(beta * (dc - dr))).mean()
    if lt == "ipo":
        return ((dc / len_c - dr / len_r - 1 / (2 * beta)) ** 2).mean()
    if lt == "bco_pair":
        return (-torch.log(torch.sigmoid(beta * dc)) - torch.log(torch.sigmoid(-beta * dr))).mean()
    raise KeyError(lt)


@pytest.mark.parametrize("lt", ["sigmoid", "ipo", "bco_pair"])
def test_sequence_api_float64(lt):
    lc, lr, len_c, len_r = _random_pairs(seed=4)
    rc, rr = lc.detach() + 0.3, lr.detach() - 0.7
    out = L.preference_loss(L.LossConfig(loss_type=lt, beta=0.2), lc, lr, rc, rr, len_c, len_r)
    want = _float64_trl_restatement(dict(loss_type=lt, beta=0.2), lc, lr, rc, rr, len_c, len_r)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.reward_margins, out.chosen_rewards - out.rejected_rewards)
    assert torch.equal(out.reward_accuracies, (out.chosen_rewards > out.rejected_rewards).double())
    assert not out.chosen_rewards.requires_grad


def test_ld_sequence_logps_definition():
    # pair 0: chosen 3 tokens, rejected 5 tokens -> shared 3; pair 1: chosen 4, rejected 2 -> shared 2
    tl = torch.arange(1, 4 * 7 + 1, dtype=torch.float64).view(4, 7)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 1:5] = True
    mask[2, 1:6] = True
    mask[3, 3:5] = True
    got = L.ld_sequence_logps(tl, mask, 0.25)
    t = tl
    want = torch.stack([
        t[0, 2:5].sum(),
        t[1, 1:3].sum() + 0.25 * t[1, 3:5].sum(),
        t[2, 1:4].sum() + 0.25 * t[2, 4:6].sum(),
        t[3, 3:5].sum(),
    ])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(L.ld_sequence_logps(tl, mask, 1.0), L.sequence_logps(tl, mask))
    # garbage at masked positions must not leak
    tl2 = tl.masked_fill(~mask, float("nan"))
    torch.testing.assert_close(L.ld_sequence_logps(tl2, mask, 0.25), want)


def test_wpo_weights_definition():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 11, generator=gen, dtype=torch.float64)
    logp = logits.log_softmax(-1)
    targets = torch.randint(0, 11, (4, 5), generator=gen)
    tl = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lssp = torch.log((logp.exp() ** 2).sum(-1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w = L.wpo_mean_logps(tl, lssp, mask)
    want = torch.stack([(tl[i] - lssp[i])[mask[i]].mean() for i in range(4)])
    torch.testing.assert_close(w, want)
    assert torch.isfinite(w).all()
    out = L.preference_loss_from_token_logps(
        L.LossConfig(use_weighting=True), tl.requires_grad_(), mask, ref_token_logps=tl.detach() * 0.9,
        log_sum_sq_probs=lssp,
    )
    torch.testing.assert_close(out.wpo_weights, torch.exp(want[:2]) * torch.exp(want[2:]))


def test_sft_and_orpo_nll_is_token_mean_over_batch():
    tl = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0], [-5.0, -5.0, -5.0], [-7.0, 0.0, 0.0]],
                      dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    out = L.preference_loss_from_token_logps(L.LossConfig(loss_type="sft"), tl, mask)
    assert float(out.loss.detach()) == pytest.approx(6.0 / 3)
    torch.testing.assert_close(out.per_pair_losses, torch.full((2,), 2.0, dtype=torch.float64))


def test_average_log_prob():
    gen = torch.Generator().manual_seed(3)
    tl = -torch.rand(4, 6, generator=gen, dtype=torch.float64)
    ref = -torch.rand(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) > 0.4
    mask[:, 0] = True
    n = mask.sum(-1)
    out = L.preference_loss_from_token_logps(L.LossConfig(average_log_prob=True, beta=1.0), tl, mask,
                                             ref_token_logps=ref)
    avg, ravg = (tl * mask).sum(-1) / n, (ref * mask).sum(-1) / n
    d = (avg[:2] - ravg[:2]) - (avg[2:] - ravg[2:])
    torch.testing.assert_close(out.loss, -F.logsigmoid(d).mean())
    torch.testing.assert_close(out.chosen_logps, avg[:2])


def test_per_pair_losses_mix_and_mean():
    lc, lr, len_c, len_r = _random_pairs(seed=9)
    rc, rr = lc.detach() * 0.9, lr.detach() * 1.1
    cfg = L.LossConfig(loss_type=["sigmoid", "hinge", "sft"], loss_weights=[0.5, 2.0, 0.1])
    out = L.preference_loss(cfg, lc, lr, rc, rr, len_c, len_r)
    torch.testing.assert_close(out.loss, out.per_pair_losses.mean())
    parts = {n: L.preference_loss(L.LossConfig(loss_type=n), lc, lr, rc, rr, len_c, len_r).loss
             for n in ("sigmoid", "hinge", "sft")}
    torch.testing.assert_close(out.loss, 0.5 * parts["sigmoid"] + 2.0 * parts["hinge"] + 0.1 * parts["sft"])
    for n in parts:
        torch.testing.assert_close(out.losses_by_type[n], parts[n].detach())


def test_alpha_divergence_clamp_and_limit():
    x = torch.tensor([-300.0, -1.0, 0.0, 2.0, 300.0], dtype=torch.float64)
    s = L.f_divergence_scores(x, "alpha_divergence", 0.5)
    coef = 1 / (0.5 - 1)
    want = (torch.exp(torch.clamp(-0.5 * x, max=80.0)) - 1) * coef
    torch.testing.assert_close(s, want)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(L.f_divergence_scores(x, "alpha_divergence", 1.0), x)
    torch.testing.assert_close(L.f_divergence_scores(x, "forward_kl", 0.5)[1:4], 1 - torch.exp(-x[1:4]))
    torch.testing.assert_close(L.f_divergence_scores(x, "js_divergence"), math.log(2) + F.logsigmoid(x))
    # fp16: the exponent is clamped at 11 (alpha = 0: coef -1, t = -x)
    h = L.f_divergence_scores(torch.tensor([-30.0, 1.0], dtype=torch.float16), "alpha_divergence", 0.0)
    assert h.dtype == torch.float16 and torch.isfinite(h).all()
    torch.testing.assert_close(h, torch.tensor([-(math.exp(11) - 1), 1 - math.exp(-1)], dtype=torch.float16))


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(loss_type="nope"), "loss_type"),
    (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_weights=[float("nan")]), "loss_weights"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=float("inf")), "beta"),
    (dict(f_divergence_type="kl"), "f_divergence_type"),
    (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(loss_type=["sigmoid", "aot"], f_divergence_type="forward_kl"), "f_divergence_type"),
    (dict(loss_type="simpo", f_divergence_type="alpha_divergence"), "f_divergence_type"),
    (dict(loss_type="exo_pair"), "label_smoothing"),
    (dict(loss_type="exo_pair", label_smoothing=1.0), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=-0.1), "label_smoothing"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(loss_type=["sigmoid", "aot_unpaired"], use_weighting=True), "use_weighting"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(ld_alpha=-0.1), "ld_alpha"),
    (dict(discopop_tau=0.0), "discopop_tau"),
    (dict(loss_type="ipo", average_log_prob=True), "average_log_prob"),
    (dict(ld_alpha=0.5, average_log_prob=True), "average_log_prob"),
    (dict(f_alpha_divergence_coef="x"), "f_alpha_divergence_coef"),
]


@pytest.mark.parametrize("kwargs,arg", BAD_CONFIGS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_CONFIGS)])
def test_bad_configs_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        L.LossConfig(**kwargs)


def test_config_is_frozen_and_normalised():
    cfg = L.LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, 2])
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 2.0)
    assert hash(cfg) == hash(L.LossConfig(loss_type=("sigmoid", "sft"), loss_weights=(1.0, 2.0)))
    with pytest.raises(Exception):
        cfg.beta = 1.0  # type: ignore[misc]
    assert L.LossConfig(loss_type="sft").needs_reference is False
    assert L.LossConfig(reference_free=True).needs_reference is False
    assert L.LossConfig().needs_reference is True
    assert L.LossConfig(use_weighting=True).needs_log_sum_sq_probs


def test_missing_inputs_raise():
    lc, lr, len_c, len_r = _random_pairs()
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        L.preference_loss(L.LossConfig(), lc, lr)
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.preference_loss(L.LossConfig(loss_type="ipo"), lc, lr, lc.detach(), lr.detach())
    with pytest.raises(ValueError, match="wpo"):
        L.preference_loss(L.LossConfig(use_weighting=True), lc, lr, lc.detach(), lr.detach())
    with pytest.raises(ValueError, match="sum_logps"):
        L.preference_loss(L.LossConfig(loss_type="sft", ld_alpha=0.5), lc, lr, None, None, len_c, len_r)
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        L.preference_loss_from_token_logps(L.LossConfig(use_weighting=True), torch.zeros(4, 3),
                                           torch.ones(4, 3, dtype=torch.bool), ref_token_logps=torch.zeros(4, 3))


def test_from_trl_config():
    from trl import DPOConfig

    args = DPOConfig(output_dir="/tmp/unused", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.2,
                     ld_alpha=0.3, use_weighting=True, discopop_tau=0.1, report_to="none", use_cpu=True, bf16=False)
    cfg = L.LossConfig.from_trl(args)
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 0.5)
    assert (cfg.beta, cfg.ld_alpha, cfg.use_weighting, cfg.discopop_tau) == (0.2, 0.3, True, 0.1)


# ----------------------------------------------------------------------------------------------------------------
# Conservative DPO and agreement with fastdpo's own sigmoid oracle (what FastDPOLoss computes)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.5])
def test_cdpo(ls):
    lc, lr, len_c, len_r = _random_pairs(seed=11)
    rc, rr = lc.detach() * 1.05, lr.detach() * 0.95
    out = L.preference_loss(L.LossConfig(beta=0.3, label_smoothing=ls, cdpo=True), lc, lr, rc, rr)
    z = 0.3 * ((lc - rc) - (lr - rr))
    want = (-(1 - ls) * torch.log(torch.sigmoid(z)) - ls * torch.log(torch.sigmoid(-z))).mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.LossConfig(label_smoothing=0.6, cdpo=True)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(label_smoothing=0.2),
    dict(average_log_prob=True, beta=0.5),
    dict(reference_free=True),
    dict(precomputed=True, label_smoothing=0.05),
])
def test_agrees_with_fastdpo_reference_dpo_loss(kw):
    """preference_loss_from_token_logps(cdpo=True) == fastdpo.reference.dpo_loss (FastDPOLoss's oracle)."""
    reference = pytest.importorskip("fastdpo.reference")
    if not hasattr(reference, "dpo_loss"):
        pytest.skip("fastdpo.reference.dpo_loss not available")
    kw = dict(kw)
    precomputed = kw.pop("precomputed", False)
    gen = torch.Generator().manual_seed(0)
    b, t, h, v = 3, 7, 8, 13
    hidden = torch.randn(2 * b, t, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_hidden = (hidden.detach() + 0.1 * torch.randn(2 * b, t, h, generator=gen, dtype=torch.float64))
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    labels[:, :2] = -100
    labels[0, 5:] = -100
    labels[4, 3:] = -100
    ref_seq = {}
    if precomputed:
        ref_seq = dict(ref_chosen_logps=-10 * torch.rand(b, generator=gen, dtype=torch.float64),
                       ref_rejected_logps=-10 * torch.rand(b, generator=gen, dtype=torch.float64))
    want = reference.dpo_loss(hidden, weight, labels, ref_hidden_states=None if precomputed else ref_hidden,
                              **ref_seq, **kw)
    # ours, from naive per-token log-probs with the HF shift
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    mask = targets != -100

    def toks(hs):
        lp = torch.log_softmax(hs @ weight.T, -1)
        return lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)

    cfg = L.LossConfig(cdpo=True, **kw)
    if precomputed:
        got = L.preference_loss_from_token_logps(cfg, toks(hidden), mask, **ref_seq)
    else:
        with torch.no_grad():
            ref_tokens = toks(ref_hidden)
        got = L.preference_loss_from_token_logps(cfg, toks(hidden), mask, ref_token_logps=ref_tokens)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-12)
    for name in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_margins",
                 "reward_accuracies"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name).to(torch.float64), rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(got.loss, (hidden, weight), retain_graph=True)
    g2 = torch.autograd.grad(want.loss, (hidden, weight))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lt", ["hinge", "sft", ["sigmoid", "sft"]])
def test_wpo_weighting_where_trl_crashes(lt):
    """TRL 1.16 multiplies the weights in place, which breaks autograd for 'hinge' (relu output) and fails outright
    for 'sft' (expanded scalar). The combination is well defined; check it against a float64 restatement."""
    lc, lr, len_c, len_r = _random_pairs(seed=12)
    rc, rr = lc.detach() * 0.97, lr.detach() * 1.02
    gen = torch.Generator().manual_seed(1)
    wc, wr = -torch.rand(6, generator=gen, dtype=torch.float64), -torch.rand(6, generator=gen, dtype=torch.float64)
    cfg = L.LossConfig(loss_type=lt, use_weighting=True, beta=0.2)
    out = L.preference_loss(cfg, lc, lr, rc, rr, len_c, len_r, chosen_wpo_logps=wc, rejected_wpo_logps=wr)
    w = torch.exp(wc) * torch.exp(wr)
    terms = {
        "hinge": torch.relu(1 - 0.2 * ((lc - rc) - (lr - rr))),
        "sft": (-lc.sum() / len_c.sum()).expand(6),
        "sigmoid": -torch.log(torch.sigmoid(0.2 * ((lc - rc) - (lr - rr)))),
    }
    names = [lt] if isinstance(lt, str) else lt
    want = sum((terms[n] * w).mean() for n in names)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    out.loss.backward()
    assert torch.isfinite(lc.grad).all()


RECIPE_CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="ipo"),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type="aot", label_smoothing=0.1, beta=0.5),
    dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.7),
    dict(loss_type=["ipo", "sft"], ld_alpha=0.3),
    dict(loss_type="sigmoid", ld_alpha=0.5, use_weighting=True, f_divergence_type="forward_kl"),
    dict(loss_type=["apo_zero", "robust", "sigmoid_norm"], use_weighting=True, label_smoothing=0.1),
]


@pytest.mark.parametrize("opts", RECIPE_CASES, ids=[_case_id(o) for o in RECIPE_CASES])
def test_fastdpo_kernels_plus_losses_match_trl(harness, opts):
    """The integration recipe for FastDPOLoss: fastdpo.linear_logprobs (with_stats for WPO) on the final hidden
    states, then preference_loss_from_token_logps, reproduces TRL 1.16's loss and gradients."""
    fastdpo = pytest.importorskip("fastdpo")
    if not hasattr(fastdpo, "linear_logprobs"):
        pytest.skip("fastdpo.linear_logprobs not available")
    cfg = L.LossConfig(**opts)
    trl_loss, (trl_gw, trl_ge) = harness.trl(opts)
    model, ref_model, batch = harness.model, harness.ref_model, harness.batch
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # HF shift, same length
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    stats = fastdpo.linear_logprobs(hidden, model.lm_head.weight, targets, None, -100,
                                    with_stats=cfg.needs_log_sum_sq_probs)
    token_logps, lssp = (stats.logps, stats.log_sum_sq_probs) if cfg.needs_log_sum_sq_probs else (stats, None)
    with torch.no_grad():
        ref_hidden = ref_model.model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
        ref_token_logps = fastdpo.linear_logprobs(ref_hidden, ref_model.lm_head.weight, targets, None, -100)
    out = L.preference_loss_from_token_logps(cfg, token_logps, targets != -100, ref_token_logps=ref_token_logps,
                                             log_sum_sq_probs=lssp)
    out.loss.backward()
    gw, ge = harness._grads()
    assert float(out.loss.detach()) == pytest.approx(float(trl_loss), rel=LOSS_RTOL, abs=1e-7)
    assert _rel(gw, trl_gw) < GRAD_RTOL and _rel(ge, trl_ge) < GRAD_RTOL
