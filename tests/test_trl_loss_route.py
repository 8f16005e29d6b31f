"""patch_trl()'s loss route against stock TRL (CPU, tiny random Llama, no downloads).

The loss route runs TRL's own `_compute_loss` with the reference log-probs computed first, while the policy's
head forms fastdpo's loss gradient in its forward; its backward checks TRL's actual gradient against that
prediction. Checked here: per-step losses and every logged metric, the gradients of one step, the scale a
gradient accumulation puts on the loss, a planted difference in TRL's loss math (the exact fallback), the
configurations that take the head route instead, and the GEMM passes of one training step; a few of these on the
Triton backend too (in its interpreter).
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings

import pytest
from test_fused_pass import GemmPasses
from test_triton_fused import DotTiles
from test_trl_patch import assert_logs_close, make_trainer, train_logs

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from fastdpo import chunked, fused_pass, trl_patch  # noqa: E402
from fastdpo.kernels.config import gemm_config  # noqa: E402
from fastdpo.trl_patch import LOSS_ROUTE_CHECKED, patch_trl, unpatch_trl  # noqa: E402
from trl.trainer import dpo_trainer as trl_dpo  # noqa: E402

CHECKED = sorted(LOSS_ROUTE_CHECKED[trl.__version__]) if trl.__version__ in LOSS_ROUTE_CHECKED else []
if not CHECKED:
    pytest.skip(f"the loss route is not checked on TRL {trl.__version__}", allow_module_level=True)

# Options a loss type needs to be valid, in TRL and fastdpo.losses.
LOSS_OPTIONS = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1)}
GRAD_RTOL = 2e-5  # one step's gradients, relative to each tensor's largest entry: float32 round-off


@pytest.fixture(autouse=True)
def _always_unpatched():
    unpatch_trl()
    trl_patch._STATE.warned.clear()
    yield
    unpatch_trl()


@pytest.fixture
def route(monkeypatch):
    """Records every loss-route head call (completed or not) and every backward's (scale, mismatch)."""
    seen = types.SimpleNamespace(passes=0, completed=0, checks=[], backends=set())
    token_pass, scale_of = fused_pass.fused_token_pass, trl_patch.predicted_scale

    def spy_pass(*args, **kwargs):
        result = token_pass(*args, **kwargs)
        seen.backends.add(kwargs["backend"])
        seen.passes += 1
        seen.completed += result is not None
        return result

    def spy_scale(incoming, predicted):
        result = scale_of(incoming, predicted)
        seen.checks.append(result)
        return result

    monkeypatch.setattr(fused_pass, "fused_token_pass", spy_pass)
    monkeypatch.setattr(trl_patch, "predicted_scale", spy_scale)
    return seen


def loss_route_logs(**kwargs):
    """Training logs of the patched trainer, with every warning it raises."""
    with patch_trl(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(**kwargs)
        warnings.simplefilter("always")
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, [str(w.message) for w in caught if "fastdpo.patch_trl()" in str(w.message)]


def compare(route, steps=3, micro_batches=1, **kwargs):
    """Stock against the loss route: every logged metric; the loss route taken on every step, no fallback."""
    stock = train_logs(make_trainer(steps=steps, **kwargs))
    patched, messages = loss_route_logs(steps=steps, **kwargs)
    assert not messages, messages
    calls = steps * micro_batches
    assert route.completed == route.passes == calls, "the loss route was not taken on every step"
    assert len(route.checks) == calls and all(scale is not None for scale, _ in route.checks), route.checks
    assert_logs_close(stock, patched)
    assert len({float(entry["loss"]) for entry in stock}) > 1, "the comparison must cover a moving policy"
    return stock, patched


def step_gradients(patched: bool, **kwargs):
    """The gradient of every trainable parameter from one loss + backward on the first batch."""
    with patch_trl() if patched else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's own deprecation warnings; the loss route's are checked elsewhere
        trainer = make_trainer(steps=1, **kwargs)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        trainer.compute_loss(trainer.model, batch).backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


def assert_gradients_close(stock, patched, rtol=GRAD_RTOL):
    assert stock.keys() == patched.keys()
    worst = 0.0
    for name in stock:
        scale = float(stock[name].abs().max())
        error = float((stock[name] - patched[name]).abs().max())
        assert error <= rtol * scale + 1e-12, f"{name}: {error:.3e} against max {scale:.3e}"
        worst = max(worst, error / scale if scale else 0.0)
    return worst


# ---------------------------------------------------------------------------------------------------------------------
# Training equality, loss type by loss type and in every reference mode
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", CHECKED)
def test_every_checked_loss_type(route, loss_type):
    compare(route, loss_type=[loss_type], **LOSS_OPTIONS.get(loss_type, {}))
    assert max(mismatch for _, mismatch in route.checks) <= trl_patch.PREDICTION_RTOL


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), id="mixed-weights"),
        pytest.param(dict(loss_type=["sigmoid"], use_weighting=True), id="wpo"),
        pytest.param(dict(loss_type=["apo_zero"], ld_alpha=0.5), id="apo_zero-ld_alpha"),
        pytest.param(dict(loss_type=["ipo"], beta=0.5, ld_alpha=0.3), id="ipo-ld_alpha"),
        pytest.param(dict(loss_type=["exo_pair"], label_smoothing=1e-3, f_divergence_type="js_divergence"),
                     id="exo_pair-js"),
        pytest.param(dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"), id="sigmoid-forward_kl"),
        pytest.param(dict(loss_type=["hinge"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
                          learning_rate=5e-3),
                     id="hinge-alpha"),
    ],
)
def test_loss_options(route, overrides):
    compare(route, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(precompute_ref_log_probs=True), id="precomputed"),
        pytest.param(dict(), id="ref_model"),
        pytest.param(dict(ref=None, use_peft=True, learning_rate=5e-2), id="peft-disabled-adapter"),
        pytest.param(dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
                     id="gradient-checkpointing"),
    ],
)
def test_reference_modes(route, overrides):
    if overrides.get("use_peft"):
        pytest.importorskip("peft")
    compare(route, **overrides)


def test_gradient_accumulation_scales_the_prediction(route):
    compare(route, steps=2, micro_batches=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    # every micro-batch's backward receives TRL's gradient divided by the accumulation steps
    assert route.passes == route.completed == len(route.checks) == 4
    for scale, _ in route.checks:
        assert math.isclose(scale, 0.5, rel_tol=1e-6), route.checks


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(loss_type=["sigmoid"]), id="sigmoid-ref_model"),
        pytest.param(dict(loss_type=["ipo"], beta=0.5, precompute_ref_log_probs=True), id="ipo-precomputed"),
        pytest.param(dict(loss_type=["sigmoid"], use_weighting=True), id="wpo"),
        pytest.param(dict(ref=None, use_peft=True), id="peft"),
    ],
)
def test_one_step_gradients_are_trls(route, overrides):
    if overrides.get("use_peft"):
        pytest.importorskip("peft")
    stock = step_gradients(False, **overrides)
    patched = step_gradients(True, **overrides)
    assert route.completed == 1
    assert assert_gradients_close(stock, patched) < GRAD_RTOL


def test_first_step_metrics_are_the_head_routes_bits(route, monkeypatch):
    """The loss route's forward is the head route's: the same log-probs, so the same logged values, to the bit."""
    loss_route, _ = loss_route_logs(steps=1)
    monkeypatch.setitem(LOSS_ROUTE_CHECKED, trl.__version__, frozenset())
    head_route, messages = loss_route_logs(steps=1)
    assert route.completed == 1 and any("head route" in m for m in messages)
    assert {k: v for k, v in loss_route[0].items() if k != "grad_norm"} == {
        k: v for k, v in head_route[0].items() if k != "grad_norm"}


# ---------------------------------------------------------------------------------------------------------------------
# Drift guards
# ---------------------------------------------------------------------------------------------------------------------


def test_planted_drift_falls_back_to_trls_exact_gradient(route, monkeypatch):
    """TRL's loss math differs from fastdpo's (an extra factor on one pair): the backward sees it, warns once and
    recomputes TRL's gradient, so training is stock TRL's."""
    plant_drift(monkeypatch)
    stock_grads = step_gradients(False)
    patched_grads = step_gradients(True)
    assert route.completed == 1 and route.checks[0][0] is None and route.checks[0][1] > 1e-2
    assert assert_gradients_close(stock_grads, patched_grads) < GRAD_RTOL
    trl_patch._STATE.warned.clear()
    stock = train_logs(make_trainer())
    patched, messages = loss_route_logs()
    assert sum("fell back" in m for m in messages) == 1, messages
    assert_logs_close(stock, patched)


def plant_drift(monkeypatch):
    """TRL's sigmoid loss with an extra factor on the first pair: TRL's gradient is no longer fastdpo's prediction."""
    real = trl_dpo.F

    def logsigmoid(x, *args, **kwargs):
        factor = torch.ones_like(x)
        factor[0] = 1.5
        return real.logsigmoid(x, *args, **kwargs) * factor

    monkeypatch.setattr(trl_dpo, "F", types.SimpleNamespace(**{**vars(real), "logsigmoid": logsigmoid}))


def test_unchecked_trl_version_takes_the_head_route(route, monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    stock = train_logs(make_trainer())
    patched, messages = loss_route_logs()
    assert route.passes == 0
    assert len(messages) == 1 and "TRL 1.17.0" in messages[0] and "head route" in messages[0], messages
    assert_logs_close(stock, patched)


@pytest.mark.parametrize(
    "overrides,why",
    [
        pytest.param(dict(loss_type=["aot"], label_smoothing=0.1), "not been checked", id="aot-unchecked"),
        pytest.param(dict(loss_type=["hinge"]), "not been checked", id="hinge-removed-from-the-table"),
    ],
)
def test_unchecked_loss_type_takes_the_head_route(route, monkeypatch, overrides, why):
    monkeypatch.setitem(LOSS_ROUTE_CHECKED, trl.__version__, frozenset(CHECKED) - {"hinge"})
    stock = train_logs(make_trainer(**overrides))
    patched, messages = loss_route_logs(**overrides)
    assert route.passes == 0
    assert len(messages) == 1 and why in messages[0] and overrides["loss_type"][0] in messages[0], messages
    assert_logs_close(stock, patched)


def test_coupled_loss_takes_the_head_route(route, monkeypatch):
    monkeypatch.setitem(LOSS_ROUTE_CHECKED, trl.__version__, frozenset(CHECKED) | {"aot"})
    patched, messages = loss_route_logs(loss_type=["aot"], label_smoothing=0.1)
    assert route.passes == 0 and len(messages) == 1 and "couples pairs" in messages[0], messages


def test_a_pair_too_long_for_the_workspace_takes_the_head_route(route, monkeypatch):
    monkeypatch.setattr(fused_pass, "DEFAULT_WORKSPACE_BYTES", 1)
    stock = train_logs(make_trainer())
    patched, messages = loss_route_logs()
    assert route.passes == 3 and route.completed == 0 and not route.checks
    assert len(messages) == 1 and "workspace" in messages[0], messages
    assert_logs_close(stock, patched)


def test_unpatched_trainers_are_stock_again(route):
    original = trl_dpo.DPOTrainer.__dict__["_compute_loss"]
    with patch_trl():
        assert trl_dpo.DPOTrainer.__dict__["_compute_loss"] is not original
        trainer = make_trainer(steps=1)
    assert trl_dpo.DPOTrainer.__dict__["_compute_loss"] is original
    train_logs(trainer)
    assert route.passes == 0


# ---------------------------------------------------------------------------------------------------------------------
# The work of one training step
# ---------------------------------------------------------------------------------------------------------------------


class HeadGemmPasses(GemmPasses):
    """GemmPasses counting only products with an operand of the head's vocabulary size (the backbone's are not)."""

    def __init__(self, n, hidden, vocab):
        super().__init__(n, hidden, vocab)
        self.vocab = vocab

    def counts(self, a, b) -> bool:
        return self.vocab in a.shape or self.vocab in b.shape


def step_passes(dots: DotTiles | None = None) -> float:
    """Passes over n·H·V of one step: torch's products, and with `dots` the Triton interpreter's tl.dot tiles."""
    trainer = make_trainer(steps=1)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n = int(batch["completion_mask"][:, 1:].sum())
    vocab, hidden = trainer.model.lm_head.weight.shape
    # The head's products all have an operand with a side of V: one token block and one vocabulary slice hold
    # the batch's scored tokens and the whole head (the backbone's products have no side of V).
    assert n <= chunked.TOKEN_BLOCK and chunked.vocab_slices(vocab, n) == [(0, vocab)]
    trainer.model.train()
    if dots is not None:
        dots.flops = 0
    with HeadGemmPasses(n, hidden, vocab) as counter:
        trainer.compute_loss(trainer.model, batch).backward()
    return counter.passes + (0 if dots is None else dots.flops / tiled_pass_flops(n, hidden, vocab))


def tiled_pass_flops(n: int, hidden: int, vocab: int) -> int:
    """The FLOPs of one pass of the interpreter's tl.dot tiles over n·H·V: each side rounded up to its tile."""
    tile = gemm_config(torch.float32, None)

    def whole(size, block):
        return -(-size // block) * block

    return 2 * whole(n, tile["BLOCK_M"]) * whole(hidden, tile["BLOCK_K"]) * whole(vocab, tile["BLOCK_V"])


def test_training_step_passes(route, monkeypatch, one_thread):
    """Policy plus reference model, trainable head: 4 passes over n·H·V on the loss route (reference 1, policy 3),
    5 on the head route (reference 1, policy 4)."""
    with patch_trl():
        loss_route = step_passes()
        assert route.completed == 1
        monkeypatch.setitem(LOSS_ROUTE_CHECKED, trl.__version__, frozenset())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head_route = step_passes()
    assert route.completed == 1
    assert loss_route == pytest.approx(4.0) and head_route == pytest.approx(5.0), (loss_route, head_route)
    print(f"GEMM passes over n·H·V of one step: loss route {loss_route}, head route {head_route}")



# ---------------------------------------------------------------------------------------------------------------------
# On the Triton backend (in its interpreter; a few configurations, the interpreter is slow)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def on_triton(monkeypatch):
    """fastdpo's head calls (the policy's fused pass, the reference's forward) on the Triton backend."""
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(loss_type=["sigmoid"]), id="sigmoid"),
        pytest.param(dict(loss_type=["ipo"], beta=0.5, use_weighting=True), id="ipo-wpo"),
        pytest.param(dict(loss_type=["exo_pair"], label_smoothing=1e-3, f_divergence_type="js_divergence"),
                     id="exo_pair-js"),
    ],
)
def test_loss_types_on_triton(route, on_triton, overrides):
    compare(route, steps=2, **overrides)
    assert route.backends == {"triton"}


def test_one_step_gradients_are_trls_on_triton(route, on_triton):
    stock = step_gradients(False, loss_type=["sigmoid"], use_weighting=True)
    patched = step_gradients(True, loss_type=["sigmoid"], use_weighting=True)
    assert route.completed == 1 and route.backends == {"triton"}
    assert assert_gradients_close(stock, patched) < GRAD_RTOL


def test_first_step_metrics_are_the_head_routes_bits_on_triton(route, monkeypatch, on_triton):
    test_first_step_metrics_are_the_head_routes_bits(route, monkeypatch)
    assert route.backends == {"triton"}


def test_planted_drift_falls_back_to_trls_exact_gradient_on_triton(route, monkeypatch, on_triton):
    """The fallback's two-pass backward runs on the Triton backend too."""
    plant_drift(monkeypatch)
    stock = step_gradients(False)
    patched = step_gradients(True)
    assert route.completed == 1 and route.backends == {"triton"}
    assert route.checks[0][0] is None and route.checks[0][1] > 1e-2
    assert assert_gradients_close(stock, patched) < GRAD_RTOL


def test_training_step_passes_on_triton(route, monkeypatch, one_thread, on_triton):
    """As on the PyTorch path: 4 passes on the loss route, 5 on the head route (tl.dot tiles and torch products)."""
    dots = DotTiles(monkeypatch)
    with patch_trl():
        loss_route = step_passes(dots)
        assert route.completed == 1 and route.backends == {"triton"}
        monkeypatch.setitem(LOSS_ROUTE_CHECKED, trl.__version__, frozenset())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head_route = step_passes(dots)
    assert loss_route == pytest.approx(4.0) and head_route == pytest.approx(5.0), (loss_route, head_route)
