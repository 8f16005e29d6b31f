"""`fastdpo.patch_trl()` against TRL's stock DPOTrainer (CPU, tiny random Llama, no downloads).

Every training comparison builds the same initial weights twice, trains a few steps stock and patched, and compares
the per-step loss and every logged metric. A spy on TRL's `ChunkedLogProbFunction.forward` proves the stock head is
not called while patched and is called again after `unpatch_trl()`.
"""

from __future__ import annotations

import math
import sys
import warnings

import pytest

from tiny_models import cpu_dpo_config, offline_env, perturbed_copy, tiny_llama, tiny_preference_dataset, tiny_tokenizer

offline_env()

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import fastdpo  # noqa: E402
from fastdpo import fused_pass, trl_patch  # noqa: E402
from fastdpo.trl_patch import TRLVersionError, is_trl_patched, patch_trl, unpatch_trl  # noqa: E402

if not callable(getattr(fastdpo, "linear_logprobs", None)):
    pytest.skip("fastdpo.linear_logprobs is not available in this build", allow_module_level=True)

from trl import DPOTrainer  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402
from trl.trainer import dpo_trainer as trl_dpo  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

# Per-step values agree to float32 rounding; the optimizer compounds last-bit differences over a few steps.
RTOL, ATOL = 1e-4, 5e-5


@pytest.fixture(autouse=True)
def _always_unpatched():
    unpatch_trl()
    yield
    unpatch_trl()


@pytest.fixture(params=["loss-route", "head-route"])
def spies(request, monkeypatch):
    """Counts calls of TRL's stock chunked head and of fastdpo's head (fastdpo.linear_logprobs, or the loss route's
    fused pass), with the token counts it sees. Every test using it runs on both routes of patch_trl()
    (tests/test_trl_loss_route.py checks the loss route's own machinery)."""
    counts = {"stock": 0, "fastdpo": 0, "fastdpo_tokens": []}
    if request.param == "head-route":
        monkeypatch.setattr(trl_patch, "LOSS_ROUTE_CHECKED", {})
    token_pass = fused_pass.fused_token_pass

    def spy_token_pass(config, hidden, weight, bias, targets, *args, **kwargs):
        counts["fastdpo"] += 1
        counts["fastdpo_tokens"].append(targets.numel())
        return token_pass(config, hidden, weight, bias, targets, *args, **kwargs)

    monkeypatch.setattr(fused_pass, "fused_token_pass", spy_token_pass)
    stock_forward = ChunkedLogProbFunction.forward

    def spy_stock(ctx, *args, **kwargs):
        counts["stock"] += 1
        return stock_forward(ctx, *args, **kwargs)

    real = fastdpo.linear_logprobs

    def spy_fastdpo(hidden, weight, targets, *args, **kwargs):
        counts["fastdpo"] += 1
        counts["fastdpo_tokens"].append(targets.numel())
        return real(hidden, weight, targets, *args, **kwargs)

    monkeypatch.setattr(ChunkedLogProbFunction, "forward", staticmethod(spy_stock))
    monkeypatch.setattr(fastdpo, "linear_logprobs", spy_fastdpo)
    return counts


def make_trainer(*, ref="explicit", use_peft=False, steps=3, model_setup=None, **overrides):
    """A DPOTrainer on the tiny model; same initial weights and data order on every call."""
    policy = tiny_llama(0)
    if model_setup is not None:
        model_setup(policy)
    ref_model = None
    if ref == "explicit":
        ref_model = perturbed_copy(policy, scale=0.05, seed=1)
    config = dict(per_device_train_batch_size=4, max_steps=steps, learning_rate=2e-2, logging_steps=1, data_seed=0,
                  dataloader_num_workers=0)
    config.update(overrides)
    peft_config = None
    if use_peft:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        torch.manual_seed(0)  # LoRA init draws from the global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOTrainer(
            model=policy,
            ref_model=ref_model,
            args=cpu_dpo_config("fastdpo_trl_", **config),
            train_dataset=tiny_preference_dataset(8, seed=0),
            processing_class=tiny_tokenizer(),
            peft_config=peft_config,
        )


def train_logs(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_logs_close(stock, patched, rtol=RTOL, atol=ATOL, keys=None):
    assert len(stock) == len(patched) > 0
    for step, (a, b) in enumerate(zip(stock, patched), start=1):
        assert a.keys() == b.keys(), f"step {step}: logged keys differ"
        for key in keys or a:
            va, vb = float(a[key]), float(b[key])
            assert math.isclose(va, vb, rel_tol=rtol, abs_tol=atol), f"step {step} {key}: stock {va} vs patched {vb}"


def compare(spies, expected_keys=("loss", "entropy", "mean_token_accuracy", "logits/chosen", "logps/chosen",
                                  "rewards/chosen", "rewards/margins", "grad_norm"), rtol=RTOL, keys=None,
            strict_loss=False, **kwargs):
    stock = train_logs(make_trainer(**kwargs))
    assert spies["stock"] > 0 and spies["fastdpo"] == 0
    spies["stock"] = 0
    with patch_trl():
        patched = train_logs(make_trainer(**kwargs))
    assert spies["stock"] == 0, "TRL's chunked log-prob head ran while patched"
    assert spies["fastdpo"] > 0
    for key in expected_keys:
        assert key in stock[0], key
    assert_logs_close(stock, patched, rtol=rtol, keys=keys)
    if strict_loss:  # tiny losses (WPO weights): relative agreement, not just below the absolute tolerance
        for a, b in zip(stock, patched):
            assert math.isclose(float(a["loss"]), float(b["loss"]), rel_tol=rtol), (a["loss"], b["loss"])
    if len(stock) > 1:  # not stuck at the step-1 constant: the comparison covers a moving policy
        assert len({float(entry["loss"]) for entry in stock}) > 1
    return stock, patched


# ---------------------------------------------------------------------------------------------------------------------
# Training equality
# ---------------------------------------------------------------------------------------------------------------------


def test_explicit_reference_sigmoid_and_stock_again_after_unpatch(spies):
    compare(spies)
    # Policy and reference each call the head; on CPU the patched head is given only the labelled tokens
    n_tokens = spies["fastdpo_tokens"]
    assert len(n_tokens) == 2 * 3
    # Trainers built while patched, and new ones, use TRL's head again after unpatching
    with patch_trl():
        trainer = make_trainer(steps=1)
    spies["stock"] = spies["fastdpo"] = 0
    train_logs(trainer)
    assert spies["stock"] > 0 and spies["fastdpo"] == 0
    assert trl_dpo.add_fused_lm_head is trl_utils.add_fused_lm_head


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(loss_type=["hinge"]), id="hinge"),
        pytest.param(dict(loss_type=["ipo"], beta=0.5), id="ipo"),
        pytest.param(dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), id="mixed-weights"),
        pytest.param(dict(loss_type=["robust"], label_smoothing=0.1), id="robust-smoothing"),
        pytest.param(dict(loss_type=["sigmoid"], use_weighting=True, strict_loss=True), id="wpo"),
        pytest.param(dict(loss_type=["apo_zero"], ld_alpha=0.5), id="apo_zero-ld_alpha"),
        pytest.param(
            dict(loss_type=["exo_pair"], label_smoothing=1e-3, f_divergence_type="js_divergence"), id="exo_pair-js"
        ),
    ],
)
def test_loss_types(spies, overrides):
    compare(spies, **overrides)


def test_logit_softcap_and_scale_from_config(spies):
    # Attributes TRL's fused head reads from the model config (Gemma-style softcap, Cohere-style logit_scale)
    def setup(model):
        model.config.final_logit_softcapping = 3.0
        model.config.logit_scale = 0.7

    compare(spies, model_setup=setup, loss_type=["sigmoid"])


def test_precomputed_reference(spies):
    compare(spies, precompute_ref_log_probs=True)


def test_peft_adapter_reference(spies):
    pytest.importorskip("peft")
    compare(spies, ref=None, use_peft=True, learning_rate=5e-2)


def test_gradient_checkpointing(spies):
    compare(spies, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})


def test_bf16_autocast(spies):
    # Stock TRL rounds each logits tile to bf16 on CPU, so the comparison is at bf16 resolution, on the first step
    # (one bf16-noisy optimizer step later, differences are no longer rounding-sized) and on values without
    # cancellation (rewards are differences of nearly equal log-probs).
    keys = ("loss", "entropy", "logits/chosen", "logits/rejected", "logps/chosen", "logps/rejected")
    compare(spies, bf16=True, steps=1, rtol=1e-2, keys=keys, expected_keys=keys)


# ---------------------------------------------------------------------------------------------------------------------
# The head itself against TRL's
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap,logit_scale,temperature", [(None, 1.0, 1.0), (2.5, 0.5, 0.7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_matches_trl_chunked_logprob(softcap, logit_scale, temperature, with_bias):
    gen = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 300
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.5).requires_grad_()
    bias = (torch.randn(v, generator=gen) * 0.1).requires_grad_() if with_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[3] = (hidden[3] @ weight.T).argmax()  # at least one top-1 hit
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    args = (targets, temperature, 64, softcap, logit_scale, outputs)
    grad_out = torch.randn(n, generator=gen)

    def run(fn):
        leaves = [t for t in (hidden, weight, bias) if t is not None]
        for t in leaves:
            t.grad = None
        res = fn(hidden, weight, bias, *args)
        (res[0] * grad_out).sum().backward()
        return [x.detach() for x in res], [t.grad.clone() for t in leaves]

    stock_out, stock_grads = run(ChunkedLogProbFunction.apply)
    with patch_trl():
        fast_out, fast_grads = run(trl_patch._FastDPOLogProbHead.apply)
    for name, a, b in zip(outputs, stock_out, fast_out):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(stock_grads, fast_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_head_only_computes_requested_outputs():
    hidden = torch.randn(5, 8)
    weight = torch.randn(20, 8)
    targets = torch.randint(0, 20, (5,))
    with patch_trl():
        out = trl_patch._FastDPOLogProbHead.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs",))
    assert out[0].shape == (5,) and all(x is None for x in out[1:])


def test_entropy_gradient_is_refused_clearly():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    targets = torch.randint(0, 20, (5,))
    with patch_trl():
        _, entropy, *_ = trl_patch._FastDPOLogProbHead.apply(
            hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs", "entropy")
        )
    assert entropy.requires_grad
    with pytest.raises(RuntimeError, match="entropy"):
        entropy.sum().backward()


def test_all_zero_entropy_gradient_passes():
    """DDP's find_unused_parameters sink and compiled graphs give every output a gradient, zeros for unused ones."""
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    targets = torch.randint(0, 20, (5,))
    with patch_trl():
        logps, entropy, *_ = trl_patch._FastDPOLogProbHead.apply(
            hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs", "entropy")
        )
    (logps.sum() + 0.0 * entropy.sum()).backward()
    assert hidden.grad is not None and bool(hidden.grad.ne(0).any())


# ZeRO-3 heads (patched and stock DPOTrainer under DeepSpeed, FastDPOLoss on a partitioned weight) are tested with two
# processes in test_distributed.py, as is DPOTrainer under DDP.


@pytest.mark.parametrize("spies", ["loss-route"], indirect=True)  # compiled graphs take the head route anyway
def test_torch_compile(spies, monkeypatch):
    """DPOConfig(torch_compile=True) trains patched like stock TRL (stock runs eager: compiling it costs ~30 s more)."""
    monkeypatch.setattr(fused_pass, "fused_token_pass", None)  # never called: the loss route refuses compiled models
    stock = train_logs(make_trainer(steps=1))
    assert spies["fastdpo"] == 0
    spies["stock"] = 0
    with patch_trl():
        compiled = make_trainer(steps=1, torch_compile=True)
        patched = train_logs(compiled)
    assert spies["stock"] == 0 and spies["fastdpo"] > 0
    assert hasattr(compiled.model_wrapped, "_orig_mod"), "the model was not compiled"
    assert_logs_close(stock, patched)


# ---------------------------------------------------------------------------------------------------------------------
# Patch mechanics
# ---------------------------------------------------------------------------------------------------------------------


def test_patch_and_unpatch_are_idempotent_and_restore_trl_exactly():
    original = trl_dpo.add_fused_lm_head
    utils_globals = dict(vars(trl_utils))
    assert original is trl_utils.add_fused_lm_head and not is_trl_patched()
    patch_trl()
    patched = trl_dpo.add_fused_lm_head
    assert patched is not original and is_trl_patched()
    patch_trl()
    assert trl_dpo.add_fused_lm_head is patched  # no double wrapping
    unpatch_trl()
    assert trl_dpo.add_fused_lm_head is original and not is_trl_patched()
    unpatch_trl()
    assert trl_dpo.add_fused_lm_head is original
    # TRL's shared utilities (and so SFT/GRPO/KTO/... trainers) are never modified
    assert dict(vars(trl_utils)) == utils_globals
    patch_trl()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    unpatch_trl()


def test_context_manager_and_nesting():
    original = trl_dpo.add_fused_lm_head
    with patch_trl() as handle:
        assert is_trl_patched() and trl_dpo.add_fused_lm_head is not original
        with patch_trl():
            assert is_trl_patched()
        assert is_trl_patched(), "inner context must not undo the outer patch"
    assert handle is not None and not is_trl_patched()
    assert trl_dpo.add_fused_lm_head is original
    with pytest.raises(KeyError):
        with patch_trl():
            raise KeyError("boom")
    assert not is_trl_patched() and trl_dpo.add_fused_lm_head is original


def test_fused_forward_of_a_patched_model(spies):
    """A model given the head while patched returns TRL's output fields, then TRL's own values once unpatched."""
    model = tiny_llama(0)
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    with patch_trl():
        trl_dpo.add_fused_lm_head(model, outputs=outputs)
        fast = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert spies["stock"] == 0 and spies["fastdpo_tokens"] == [2 * 5]  # only the 10 labelled next tokens
    stock = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert spies["stock"] == 1
    for name in outputs + ("loss", "label_mask"):
        a, b = getattr(stock, name), getattr(fast, name)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    # generation path (fused_lm_head=False) is the model's own forward
    assert model(input_ids=ids).logits.shape == (2, 9, 300)


def test_unsupported_trl_version_raises(monkeypatch):
    for version in ("1.14.2", "0.29.1", "2.0.0", "not-a-version"):
        monkeypatch.setattr(trl, "__version__", version)
        with pytest.raises(TRLVersionError, match="supports TRL >=1.15,<2"):
            patch_trl()
        assert not is_trl_patched() and trl_dpo.add_fused_lm_head is trl_utils.add_fused_lm_head
    monkeypatch.setattr(trl, "__version__", "1.17.0.dev0")
    with patch_trl():
        assert is_trl_patched()


def test_missing_trl_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError
    with pytest.raises(TRLVersionError, match="TRL is not installed"):
        patch_trl()
    assert not is_trl_patched()


def test_unexpected_trl_layout_raises(monkeypatch):
    def add_fused_lm_head(model, **kwargs):  # a refactored TRL without the chunked head lookup
        return None

    monkeypatch.setattr(trl_utils, "add_fused_lm_head", add_fused_lm_head)
    with pytest.raises(TRLVersionError, match="layout"):
        patch_trl()
    assert not is_trl_patched()


def test_foreign_patch_is_not_stacked(monkeypatch):
    monkeypatch.setattr(trl_dpo, "add_fused_lm_head", lambda model, **kwargs: None)
    with pytest.raises(TRLVersionError, match="another library"):
        patch_trl()
    assert not is_trl_patched()
