"""FastDPOLoss against reference.dpo_loss (float64), on the torch path and the Triton kernels."""

import pytest
import torch
from helpers import CONFIG_IDS, CONFIGS, DEVICE, as_reference, assert_close, leaf

import fastdpo
from fastdpo import reference


def make_batch(pairs=3, seq_len=10, hidden=31, vocab=150, prompt_len=4):
    hs = torch.randn(2 * pairs, seq_len, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) * (2.0 / hidden**0.5)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len))
    labels[:, :prompt_len] = -100
    # Ragged completions: right padding of random length, at least one completion token left.
    for row, pad in enumerate(torch.randint(0, seq_len - prompt_len - 1, (2 * pairs,)).tolist()):
        if pad:
            labels[row, -pad:] = -100
    return hs, w, labels


def run_both(hs, w, labels, dtype, backend, tol, bias=None, loss_kwargs=None, **forward_kwargs):
    """Run FastDPOLoss and the oracle on the same (rounded) inputs; compare outputs and gradients."""
    loss_kwargs = loss_kwargs or {}
    h, weight = leaf(hs, dtype), leaf(w, dtype)
    b = None if bias is None else leaf(bias, dtype)
    refs = [as_reference(t) for t in (h, weight)] + [None if b is None else as_reference(b)]
    # Sequence log-probs stay float32 (float64 in float64 runs); everything else takes the run's dtype.
    # The oracle gets the same rounded values in float64.
    fast_fwd = {k: v.to(DEVICE, _forward_dtype(k, dtype)) for k, v in forward_kwargs.items()}
    ref_fwd = {k: v.double().cpu() for k, v in fast_fwd.items()}

    out = fastdpo.FastDPOLoss(backend=backend, **loss_kwargs)(h, weight, labels.to(DEVICE), b, **fast_fwd)
    expected = reference.dpo_loss(refs[0], refs[1], labels, refs[2], **ref_fwd, **loss_kwargs)
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_margins"):
        assert_close(getattr(out, name).reshape(-1), getattr(expected, name).reshape(-1), tol, name)
    assert torch.equal(out.reward_accuracies.cpu().double(), expected.reward_accuracies.double())
    out.loss.backward()
    expected.loss.backward()
    for name, got, want in zip(("hidden", "weight", "bias"), (h, weight, b), refs):
        if got is not None:
            assert_close(got.grad, want.grad, tol, f"grad {name}")
    return out


def _forward_dtype(name, dtype):
    return torch.promote_types(dtype, torch.float32) if name.endswith("_logps") else dtype


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_precomputed_reference(backend, dtype, tol, average_log_prob):
    hs, w, labels = make_batch()
    run_both(hs, w, labels, dtype, backend, tol, ref_chosen_logps=torch.randn(3) * 5 - 20,
             ref_rejected_logps=torch.randn(3) * 5 - 20,
             loss_kwargs=dict(beta=0.3, label_smoothing=0.1, average_log_prob=average_log_prob))


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
def test_reference_hidden_states_share_the_head(backend, dtype, tol):
    hs, w, labels = make_batch(hidden=96)
    bias = torch.randn(w.shape[0], dtype=torch.float64)
    run_both(hs, w, labels, dtype, backend, tol, bias=bias, ref_hidden_states=hs + 0.3 * torch.randn_like(hs))


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
def test_reference_with_its_own_head(backend, dtype, tol):
    hs, w, labels = make_batch()
    ref_w = w + 0.1 * torch.randn_like(w)
    run_both(hs, w, labels, dtype, backend, tol, ref_hidden_states=hs + 0.3 * torch.randn_like(hs),
             ref_lm_head_weight=ref_w, ref_lm_head_bias=torch.randn(w.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
def test_reference_free(backend, dtype, tol):
    hs, w, labels = make_batch(pairs=2)
    run_both(hs, w, labels, dtype, backend, tol, loss_kwargs=dict(reference_free=True, beta=1.0))


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_one_token_completions_and_fully_masked_rows(backend, dtype, tol, average_log_prob):
    hs, w, labels = make_batch(pairs=3, seq_len=6)
    labels[:] = -100
    labels[0, 5] = 7        # one completion token (the label at position 5 is predicted from position 4)
    labels[3, 2] = 11       # its rejected partner: one token too
    labels[4, 3:] = 5       # pair 1: a normal rejected completion; its chosen row 1 stays fully masked
    out = run_both(hs, w, labels, dtype, backend, tol, ref_chosen_logps=torch.zeros(3),
                   ref_rejected_logps=torch.zeros(3), loss_kwargs=dict(average_log_prob=average_log_prob))
    assert out.chosen_logps[1] == 0 and out.rejected_logps[2] == 0  # fully masked: log-prob 0, no NaN
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
def test_unshifted_labels_and_other_ignore_index(backend, dtype, tol):
    hs, w, labels = make_batch()
    labels[labels == -100] = -1
    run_both(hs, w, labels, dtype, backend, tol, ref_chosen_logps=torch.randn(3), ref_rejected_logps=torch.randn(3),
             loss_kwargs=dict(shift_labels=False, ignore_index=-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_trains_hidden_only(backend):
    hs, w, labels = make_batch()
    h = leaf(hs, torch.float32)
    weight = w.float().to(DEVICE)  # no requires_grad: a frozen LM head, as with LoRA
    out = fastdpo.FastDPOLoss(backend=backend)(h, weight, labels.to(DEVICE), ref_chosen_logps=torch.zeros(3),
                                               ref_rejected_logps=torch.zeros(3))
    out.loss.backward()
    h_ref = as_reference(h)
    reference.dpo_loss(h_ref, w, labels, ref_chosen_logps=torch.zeros(3, dtype=torch.float64),
                       ref_rejected_logps=torch.zeros(3, dtype=torch.float64)).loss.backward()
    assert_close(h.grad, h_ref.grad, 1e-4, "grad hidden")


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy under the interpreter, on NaN
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_hidden_state_gives_nan_loss(backend):
    hs, w, labels = make_batch()
    hs[0, 4, 0] = float("nan")  # position 4 predicts labels[0, 5], always a completion token here
    out = fastdpo.FastDPOLoss(backend=backend)(hs.float().to(DEVICE), w.float().to(DEVICE), labels.to(DEVICE),
                                               ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))
    assert torch.isnan(out.loss)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "reference")
    hs, w, labels = make_batch()
    out = fastdpo.FastDPOLoss()(hs, w, labels, ref_chosen_logps=torch.zeros(3, dtype=torch.float64),
                                ref_rejected_logps=torch.zeros(3, dtype=torch.float64))
    expected = reference.dpo_loss(hs, w, labels, ref_chosen_logps=torch.zeros(3, dtype=torch.float64),
                                  ref_rejected_logps=torch.zeros(3, dtype=torch.float64))
    assert_close(out.loss.reshape(1), expected.loss.reshape(1), 1e-12, "loss")


# Every loss type (and the options that change the per-token -> per-sequence path) through FastDPOLoss,
# against the oracle's naive float64 token statistics fed to the same loss functions (which
# tests/test_losses.py checks against TRL's DPOTrainer).
LOSS_OPTIONS = [
    dict(loss_type=name) for name in (
        "sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
        "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "orpo")
] + [
    dict(loss_type="exo_pair", label_smoothing=1e-3),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type="apo_zero", ld_alpha=0.5),
    dict(loss_type="sigmoid", average_log_prob=True, label_smoothing=0.1),
    dict(loss_type="sigmoid", softcap=3.0, temperature=0.9),  # Gemma-style logits, the fused path on Triton
    dict(loss_type="ipo", logit_scale=1.5),
]
LOGIT_TRANSFORM = ("softcap", "temperature", "logit_scale")


def _option_id(options):
    return "-".join(f"{v}" if k == "loss_type" else f"{k}={v}" for k, v in options.items()).replace(" ", "")


@pytest.mark.parametrize("backend,dtype,tol", [CONFIGS[0], CONFIGS[2]], ids=[CONFIG_IDS[0], CONFIG_IDS[2]])
@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=_option_id)
def test_every_loss_type_matches_the_oracle(backend, dtype, tol, options):
    from fastdpo.losses import LossConfig, preference_loss_from_token_logps
    from fastdpo.sequences import shifted_targets

    hs, w, labels = make_batch(pairs=4)
    ref_hs = hs + 0.5 * torch.randn_like(hs)
    h, weight = leaf(hs, dtype), leaf(w, dtype)
    out = fastdpo.FastDPOLoss(backend=backend, beta=0.2, **options)(h, weight, labels.to(DEVICE),
                                                                   ref_hidden_states=ref_hs.to(DEVICE, dtype))
    h_ref, w_ref = as_reference(h), as_reference(w)
    targets = shifted_targets(labels)
    transform = {k: v for k, v in options.items() if k in LOGIT_TRANSFORM}
    stats = reference.token_stats(h_ref, w_ref, targets, **transform)
    ref_tokens = reference.token_logprobs(ref_hs.to(dtype).double(), w_ref.detach(), targets, **transform)
    cfg = LossConfig(beta=0.2, cdpo=True, **{k: v for k, v in options.items() if k not in LOGIT_TRANSFORM})
    expected = preference_loss_from_token_logps(cfg, stats.logps, targets != -100, ref_token_logps=ref_tokens,
                                                log_sum_sq_probs=stats.log_sum_sq_probs)
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert_close(getattr(out, name).reshape(-1), getattr(expected, name).reshape(-1), tol, name)
    out.loss.backward()
    expected.loss.backward()
    assert_close(h.grad, h_ref.grad, tol, "grad hidden")
    assert_close(weight.grad, w_ref.grad, tol, "grad weight")


@pytest.mark.parametrize("backend,dtype,tol", CONFIGS, ids=CONFIG_IDS)
def test_token_metrics_from_the_kernel_pass(backend, dtype, tol):
    hs, w, labels = make_batch()
    out = fastdpo.FastDPOLoss(backend=backend, token_metrics=True)(
        hs.to(DEVICE, dtype), w.to(DEVICE, dtype), labels.to(DEVICE), ref_chosen_logps=torch.zeros(3),
        ref_rejected_logps=torch.zeros(3))
    from fastdpo.sequences import shifted_targets

    targets = shifted_targets(labels)
    mask = targets != -100
    stats = reference.token_stats(hs.to(dtype).double(), w.to(dtype).double(), targets)
    expected = {
        "entropy": stats.entropy[mask].mean(),
        "mean_token_accuracy": stats.is_top1[mask].double().mean(),
        "logits/chosen": stats.mean_logits[:3][mask[:3]].mean(),
        "logits/rejected": stats.mean_logits[3:][mask[3:]].mean(),
    }
    assert set(out.token_metrics) == set(expected)
    for name, value in expected.items():
        assert_close(out.token_metrics[name].reshape(1), value.reshape(1), tol, name)
    assert set(out.metrics()) >= set(expected) | {"rewards/chosen", "logps/rejected"}
