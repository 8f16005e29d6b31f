"""The fused routes on the PyTorch path (fastdpo.fused_pass): GEMM passes, the float64 oracle, bitwise
agreement with the two-pass path, determinism, the fallback, pair-locality of the losses, and memory."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, relative_error, run_custom_op_inside
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastdpo
from fastdpo import fused_pass, reference
from fastdpo.losses import LOSS_FUNCTIONS, PAIR_COUPLED_LOSS_TYPES, LossConfig, preference_loss_from_token_logps
from fastdpo.sequences import shifted_targets

TOL = 1e-4  # float32 against float64, relative to the largest magnitude
# Options each loss type needs to be valid (fastdpo.losses.LossConfig's checks).
LOSS_OPTIONS = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1),
                "aot": dict(label_smoothing=0.1), "simpo": dict(label_smoothing=0.1)}
PAIR_LOCAL = sorted(set(LOSS_FUNCTIONS) - PAIR_COUPLED_LOSS_TYPES)


def make_batch(pairs=3, seq_len=150, hidden=31, vocab=300, prompt=4, masked_row=True):
    """Odd sizes; pairs long enough to span several 128-row token blocks, with ragged lengths, a fully
    masked rejected row and a one-token chosen completion (labels, before the shift). The float64 values
    are float32 numbers, so that the oracle sees what the float32 runs see."""
    hs = torch.randn(2 * pairs, seq_len, hidden).double()
    w = (torch.randn(vocab, hidden) * (2.0 / hidden**0.5)).double()
    labels = torch.randint(0, vocab, (2 * pairs, seq_len))
    labels[:, :prompt] = -100
    for row, pad in enumerate(torch.randint(0, seq_len - prompt - 1, (2 * pairs,)).tolist()):
        if pad:
            labels[row, -pad:] = -100
    if masked_row:
        labels[-1] = -100  # a fully masked rejected sequence
    labels[0, prompt + 2:] = -100  # a one-token chosen completion (after the shift)
    return hs, w, labels


def schedule_of(labels) -> fused_pass.PairSchedule:
    """The fused pass's schedule for these (unshifted) labels, in 128-row blocks."""
    rows = (shifted_targets(labels).reshape(-1) != -100).nonzero().squeeze(1)
    return fused_pass.PairSchedule(rows, labels.shape[1], labels.shape[0] // 2, 128)


def fitting_workspace(labels, vocab: int, at_least: int = 0) -> int:
    """Bytes for the slots the schedule needs (at least `at_least` slots) of 128 float32 rows of logits."""
    return max(at_least, schedule_of(labels).slots) * 128 * vocab * 4


def leaves(hs, w, bias, dtype=torch.float32, frozen=False):
    h = hs.to(dtype).requires_grad_()
    weight = w.to(dtype).requires_grad_(not frozen)
    b = None if bias is None else bias.to(dtype).requires_grad_(not frozen)
    return h, weight, b


class FusedSpy:
    """Counts the calls of the fused pass and how many of them ran to the end (not a fallback)."""

    def __init__(self, monkeypatch):
        self.calls, self.completed = 0, 0
        original = fused_pass._fused_pass

        def spy(*args, **kwargs):
            result = original(*args, **kwargs)
            self.calls += 1
            self.completed += result is not None
            return result

        monkeypatch.setattr(fused_pass, "_fused_pass", spy)


@pytest.fixture
def spy(monkeypatch):
    return FusedSpy(monkeypatch)


def run(hs, w, labels, bias=None, frozen=False, dtype=torch.float32, backend="torch", **options):
    """FastDPOLoss forward + backward: (output, grads of hidden, weight, bias)."""
    reference_inputs = {k: options.pop(k) for k in list(options) if k.startswith("ref_")}
    h, weight, b = leaves(hs, w, bias, dtype, frozen)
    out = fastdpo.FastDPOLoss(backend=backend, **options)(h, weight, labels, b, **{
        k: (v.to(dtype) if k == "ref_hidden_states" else v) for k, v in reference_inputs.items()})
    out.loss.backward()
    return out, [None if t is None else t.grad for t in (h, weight, b)]


def oracle(hs, w, labels, bias=None, transform=None, **options):
    """float64: the naive head (fastdpo.reference) and the same loss functions, through plain autograd."""
    transform = transform or {}
    reference_inputs = {k: options.pop(k) for k in list(options) if k.startswith("ref_")}
    config = LossConfig(cdpo=True, **{k: v for k, v in options.items() if k != "token_metrics"})
    h, weight = hs.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    targets = shifted_targets(labels)
    stats = reference.token_stats(h, weight, targets, b, **transform)
    ref = {}
    if "ref_hidden_states" in reference_inputs:
        with torch.no_grad():
            ref["ref_token_logps"] = reference.token_logprobs(reference_inputs["ref_hidden_states"], w, targets, bias,
                                                              **transform)
    else:
        ref = {k: v.double() for k, v in reference_inputs.items()}
    terms = preference_loss_from_token_logps(config, stats.logps, targets != -100, log_sum_sq_probs=stats.log_sum_sq_probs,
                                             **ref)
    terms.loss.backward()
    return terms, [None if t is None else t.grad for t in (h, weight, b)]


def precomputed_reference(hs, w, labels, bias=None, **transform):
    """Reference sequence log-probs near the policy's, so that no loss saturates."""
    targets = shifted_targets(labels)
    logps = reference.sequence_logprobs(reference.token_logprobs(hs, w, targets, bias, **transform), targets)
    logps = logps.float() + torch.randn(logps.shape)
    chosen, rejected = logps.chunk(2)
    return dict(ref_chosen_logps=chosen, ref_rejected_logps=rejected)


# --- every loss type against the float64 oracle ---------------------------------------------------------------


HEADS = {
    "linear": dict(),
    "bias+temperature": dict(bias=True, temperature=0.8),
    "softcap+scale": dict(softcap=4.0, logit_scale=1.3),
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("loss_type", PAIR_LOCAL)
def test_every_pair_local_loss_against_float64(loss_type, head, spy):
    # ORPO's log-odds are -inf for an empty completion (log-prob 0), on every path.
    hs, w, labels = make_batch(masked_row=loss_type != "orpo")
    head_options = dict(HEADS[head])
    bias = torch.randn(w.shape[0]).double() if head_options.pop("bias", False) else None
    options = dict(loss_type=loss_type, beta=0.2, **LOSS_OPTIONS.get(loss_type, {}))
    ref = precomputed_reference(hs, w, labels, bias, **head_options)
    # The slots the schedule needs and no more (ragged pairs of up to ~150 tokens: usually several slots,
    # with groups that split the pairs unevenly).
    workspace = fitting_workspace(labels, w.shape[0])
    out, grads = run(hs, w, labels, bias, workspace_bytes=workspace, **options, **head_options, **ref)
    assert spy.completed == 1
    _, two_pass_grads = run(hs, w, labels, bias, fused=False, **options, **head_options, **ref)
    expected, expected_grads = oracle(hs, w, labels, bias, head_options, **options, **ref)
    assert_close(out.loss, expected.loss, TOL, "loss")
    # (the rewards are these minus the reference: their relative error is the log-probs' cancellation)
    for name in ("chosen_logps", "rejected_logps"):
        assert_close(getattr(out, name), getattr(expected, name), TOL, name)
    for name, got, two_pass, want in zip(("hidden", "weight", "bias"), grads, two_pass_grads, expected_grads):
        if want is not None:
            assert_as_close_as_two_pass(got, two_pass, want, f"grad {name}")


def assert_as_close_as_two_pass(got, two_pass, want, what):
    """Within TOL of float64, or no further than the two-pass path: the float32 rounding of the loss itself
    (sums of hundreds of log-probs; exp(-rho) in discopop) or of huge logits reaches both paths alike."""
    assert_close(got, want, max(TOL, 1.05 * relative_error(two_pass, want)), what)


@pytest.mark.parametrize("options", [
    dict(loss_type="ipo", use_weighting=True, token_metrics=True),
    dict(loss_type="sigmoid", ld_alpha=0.4),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], average_log_prob=True),
    dict(loss_type="hinge", f_divergence_type="js_divergence"),
], ids=["wpo", "ld-dpo", "rpo-average", "js-hinge"])
def test_loss_options_against_float64(options, spy):
    hs, w, labels = make_batch(pairs=2)
    ref = precomputed_reference(hs, w, labels)
    out, grads = run(hs, w, labels, workspace_bytes=fitting_workspace(labels, w.shape[0]), **options, **ref)
    assert spy.completed == 1
    expected, expected_grads = oracle(hs, w, labels, **options, **ref)
    assert_close(out.loss, expected.loss, TOL, "loss")
    for name, got, want in zip(("hidden", "weight"), grads, expected_grads):
        assert_close(got, want, TOL, f"grad {name}")


def test_reference_hidden_states_against_float64(spy):
    hs, w, labels = make_batch(pairs=2)
    ref_hs = hs + 0.1 * torch.randn_like(hs)
    out, grads = run(hs, w, labels, ref_hidden_states=ref_hs, beta=0.5)
    assert spy.completed == 1
    expected, expected_grads = oracle(hs, w, labels, ref_hidden_states=ref_hs, beta=0.5)
    assert_close(out.loss, expected.loss, TOL, "loss")
    for name, got, want in zip(("hidden", "weight"), grads, expected_grads):
        assert_close(got, want, TOL, f"grad {name}")


# --- bitwise: the two-pass path's log-probs and metrics, run to run --------------------------------------------


def outputs(out):
    values = {name: getattr(out, name) for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards",
                                                      "rejected_rewards", "reward_margins", "reward_accuracies")}
    return {**values, **out.token_metrics}


def head_inputs(head, w):
    """(bias or None, transform options) of one of HEADS."""
    options = dict(HEADS[head])
    return (torch.randn(w.shape[0]).double() if options.pop("bias", False) else None), options


@pytest.mark.parametrize("head", list(HEADS))
def test_logps_and_metrics_are_the_two_pass_bits_and_runs_repeat_bitwise(head, spy):
    hs, w, labels = make_batch()
    assert_two_pass_bits_and_repeat(hs, w, labels, *head_inputs(head, w), spy, TOL)


def assert_two_pass_bits_and_repeat(hs, w, labels, bias, head_options, spy, tol, **options):
    """Fused log-probs and metrics the two-pass route's bits, twice; gradients repeat bitwise."""
    options = dict(loss_type=["sigmoid", "ipo"], use_weighting=True, token_metrics=True, **head_options, **options,
                   **precomputed_reference(hs, w, labels, bias, **head_options))
    fused, fused_grads = run(hs, w, labels, bias, **options)
    again, again_grads = run(hs, w, labels, bias, **options)
    two_pass, two_pass_grads = run(hs, w, labels, bias, fused=False, **options)
    assert spy.completed == 2
    for name, value in outputs(two_pass).items():
        assert torch.equal(outputs(fused)[name], value), name
        assert torch.equal(outputs(again)[name], value), name
    for got, again_got, want in zip(fused_grads, again_grads, two_pass_grads):
        if want is not None:
            assert torch.equal(got, again_got)
            assert_close(got, want, tol)


# --- the fallback -----------------------------------------------------------------------------------------------


def assert_same_as_two_pass(hs, w, labels, **options):
    fused, fused_grads = run(hs, w, labels, **options)
    two_pass, two_pass_grads = run(hs, w, labels, fused=False, **options)
    for name, value in outputs(two_pass).items():
        assert torch.equal(outputs(fused)[name], value), name
    for got, want in zip(fused_grads, two_pass_grads):
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", sorted(PAIR_COUPLED_LOSS_TYPES))
def test_losses_that_couple_pairs_take_the_two_pass_path(loss_type, backend, spy):
    hs, w, labels = make_batch(pairs=2, seq_len=40)
    assert_same_as_two_pass(hs, w, labels, backend=backend, loss_type=loss_type, **LOSS_OPTIONS.get(loss_type, {}),
                            **precomputed_reference(hs, w, labels))
    assert spy.calls == 0


def test_a_pair_too_long_for_the_workspace_takes_the_two_pass_path(spy):
    hs, w, labels = make_batch(pairs=2, seq_len=300)
    labels[:, 4:] = torch.randint(0, w.shape[0], labels[:, 4:].shape)  # every sequence ~300 tokens long
    schedule = schedule_of(labels)
    # One slot fewer than the schedule needs (each holds 128 rows of V float32 logits).
    assert schedule.slots >= 2
    assert_same_as_two_pass(hs, w, labels, workspace_bytes=(schedule.slots - 1) * 128 * w.shape[0] * 4,
                            **precomputed_reference(hs, w, labels))
    assert spy.calls == 1 and spy.completed == 0


@pytest.mark.parametrize("rows_far_below", [1, 140])
def test_rows_far_below_their_maximum_are_recomputed(rows_far_below, spy):
    """Rows that leave the shifted forward for the online one: the same log-probs as the two-pass path,
    gradients against float64 (140 rows: a whole token block of them, and more)."""
    hs, w, labels = make_batch(pairs=2)
    targets = shifted_targets(labels)
    scored = (targets != -100).nonzero()[:rows_far_below]
    for row, t in scored.tolist():
        hs[row, t] *= 200  # huge logits: the target (the smallest logit) lies far below the row's maximum
        labels[row, t + 1] = (hs[row, t] @ w.T).argmin()
    ref = precomputed_reference(hs, w, labels)
    fused, grads = run(hs, w, labels, **ref)
    two_pass, two_pass_grads = run(hs, w, labels, fused=False, **ref)
    assert spy.completed == 1
    for name, value in outputs(two_pass).items():
        assert torch.equal(outputs(fused)[name], value), name
    _, expected_grads = oracle(hs, w, labels, **ref)
    for name, got, two_pass_grad, want in zip(("hidden", "weight"), grads, two_pass_grads, expected_grads):
        assert_as_close_as_two_pass(got, two_pass_grad, want, f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tolerance_and_no_grad_take_the_two_pass_path(backend, spy):
    hs, w, labels = make_batch(pairs=2, seq_len=40)
    assert_same_as_two_pass(hs, w, labels, backend=backend, grad_tolerance=1e-3, **precomputed_reference(hs, w, labels))
    with torch.no_grad():
        fastdpo.FastDPOLoss(backend=backend)(hs.float(), w.float(), labels, **precomputed_reference(hs, w, labels))
    assert spy.calls == 0


# --- pair-locality of the losses marked so ----------------------------------------------------------------------


def loss_inputs(pairs=5, seq_len=7):
    mask = torch.rand(2 * pairs, seq_len) < 0.7
    mask[0] = False  # a fully masked sequence
    token_logps = -torch.rand(2 * pairs, seq_len) * 3
    return dict(token_logps=token_logps, mask=mask, ref_token_logps=token_logps + 0.3 * torch.randn_like(token_logps),
                log_sum_sq_probs=-torch.rand(2 * pairs, seq_len))


def gradients_from_placeholders(config, inputs, done: list[int]):
    """The token gradient of pairs `done` with every other pair's log-probs at placeholders."""
    mask, pairs = inputs["mask"], inputs["mask"].shape[0] // 2
    grads = fused_pass.LossGradients(config, mask, torch.float32, True, ref_token_logps=inputs["ref_token_logps"])
    rows = torch.tensor([p for p in done] + [p + pairs for p in done])
    positions = (rows[:, None] * mask.shape[1] + torch.arange(mask.shape[1])).reshape(-1)
    grads.record(positions, inputs["token_logps"][rows].reshape(-1), inputs["log_sum_sq_probs"][rows].reshape(-1))
    return grads.token_grads().view(mask.shape)[rows]


def full_gradients(config, inputs, done):
    logps = inputs["token_logps"].clone().requires_grad_()
    terms = preference_loss_from_token_logps(config, logps, inputs["mask"], ref_token_logps=inputs["ref_token_logps"],
                                             log_sum_sq_probs=inputs["log_sum_sq_probs"])
    (grad,) = torch.autograd.grad(terms.loss, logps)
    pairs = logps.shape[0] // 2
    return grad[torch.tensor(done + [p + pairs for p in done])]


VARIANTS = {"plain": {}, "wpo": dict(use_weighting=True), "ld-dpo": dict(ld_alpha=0.5),
            "average": dict(average_log_prob=True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_FUNCTIONS))
def test_pair_local_losses_give_the_full_batch_gradient_from_placeholders(loss_type, variant):
    """Every loss not in PAIR_COUPLED_LOSS_TYPES must give a group's gradient from placeholders exactly;
    for those in it the check must see the coupling (so the check can tell)."""
    try:
        config = LossConfig(loss_type=loss_type, beta=2.0, **LOSS_OPTIONS.get(loss_type, {}), **VARIANTS[variant])
    except ValueError:
        pytest.skip("an invalid combination")
    done = [1, 3]
    differs = []
    for _ in range(20):  # a sort keeps the group's ranks on about 1 draw in 3: 20 draws all do so ~1e-10 of the time
        inputs = loss_inputs()
        got, want = gradients_from_placeholders(config, inputs, done), full_gradients(config, inputs, done)
        if config.pair_local:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        differs.append(not torch.allclose(got, want, rtol=1e-4, atol=1e-6))
    if not config.pair_local and variant == "plain":
        assert any(differs)


# --- the frozen-head route --------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", list(HEADS))
def test_frozen_head_logprobs_any_upstream_loss_against_float64(head):
    hs, w, labels = make_batch()
    options = dict(HEADS[head])
    bias = torch.randn(w.shape[0]).double() if options.pop("bias", False) else None
    targets = shifted_targets(labels)
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    results = {}
    for fused in (True, False):
        h, weight, b = leaves(hs, w, bias, frozen=True)
        stats = fastdpo.linear_logprobs(h, weight, targets, b, backend="torch", with_stats=True, fused=fused,
                                        **options)
        (stats.logps * upstream.float()).square().sum().backward()  # any upstream loss
        results[fused] = stats, h.grad
    for got, want in zip(results[True][0], results[False][0]):
        assert torch.equal(got, want)  # the same log-probs and statistics, bit for bit
    h64 = hs.clone().requires_grad_()
    logps = reference.token_logprobs(h64, w, targets, bias, **options)
    (logps * upstream).square().sum().backward()
    assert_close(results[True][1], h64.grad, TOL, "grad hidden")


def test_frozen_head_is_exact_on_peaked_rows():
    """Rows with p_y >= 0.999: U = W_y - sum_v p_v W_v is a small difference; the target column is left
    out and 1 - p_y summed on its own, so each row's gradient keeps its relative accuracy."""
    assert_peaked_rows_exact("torch", rows=256, hidden=64, vocab=4096)


def peaked_rows(logps64: torch.Tensor) -> torch.Tensor:
    """Rows with p_y >= 0.999 whose float64 gradient is itself exact to 1e-6: the oracle's 1 - p_y cancels too,
    with an absolute error near 2^-53, so rows with 1 - p_y below 1e-10 cannot check a 1e-3 bound."""
    return (logps64.exp() >= 0.999) & (-logps64 >= 1e-10)


def assert_peaked_rows_exact(backend: str, rows: int, hidden: int, vocab: int):
    """linear_logprobs on a frozen head, each target its row's largest logit: peaked rows' dX within 1e-3."""
    w = torch.randn(vocab, hidden) * 0.3
    h = torch.randn(rows, hidden)
    targets = (h @ w.T).argmax(1)
    h = (6 * h).requires_grad_()
    logps = fastdpo.linear_logprobs(h, w, targets, backend=backend)
    logps.sum().backward()
    h64 = h.detach().double().requires_grad_()
    expected = reference.token_logprobs(h64, w.double(), targets)
    expected.sum().backward()
    peaked = peaked_rows(expected)
    assert int(peaked.sum()) >= 10
    row_error = (h.grad.double() - h64.grad).norm(dim=1) / h64.grad.norm(dim=1)
    assert float(row_error[peaked].max()) < 1e-3


def test_frozen_head_row_far_below_its_maximum():
    """A row that leaves the shifted forward for the online one is finished by the two-pass backward."""
    hs, w, labels = make_batch(pairs=1, seq_len=30)
    targets = shifted_targets(labels)
    hs[0, 5] *= 300
    targets[0, 5] = (hs[0, 5] @ w.T).argmin()
    h = hs.float().requires_grad_()
    fastdpo.linear_logprobs(h, w.float(), targets, backend="torch").sum().backward()
    h64 = hs.clone().requires_grad_()
    reference.token_logprobs(h64, w, targets).sum().backward()
    assert_close(h.grad, h64.grad, TOL, "grad hidden")


def test_frozen_head_in_fastdpoloss_against_float64():
    hs, w, labels = make_batch(pairs=2)
    ref = precomputed_reference(hs, w, labels)
    out, grads = run(hs, w, labels, frozen=True, loss_type="sigmoid", **ref)
    expected, expected_grads = oracle(hs, w, labels, loss_type="sigmoid", **ref)
    assert_close(out.loss, expected.loss, TOL, "loss")
    assert_close(grads[0], expected_grads[0], TOL, "grad hidden")
    assert grads[1] is None


# --- passes over n·H·V -------------------------------------------------------------------------------------------


class GemmPasses(TorchDispatchMode):
    """Counts the FLOPs of every matrix product, in passes of 2·n·H·V."""

    PRODUCTS = {"mm", "addmm", "matmul", "bmm", "baddbmm", "mv", "addmv", "dot", "vdot", "linear"}

    def __init__(self, n, hidden, vocab):
        super().__init__()
        self.flops, self.unit = 0, 2 * n * hidden * vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = run_custom_op_inside(self, func, args, kwargs)  # fastdpo's custom ops: the ops inside them
        if inside is not None:
            return inside
        name = func.__name__.split(".")[0].rstrip("_")
        if name in self.PRODUCTS:
            a, b = (args[1], args[2]) if name.startswith(("addm", "baddb")) else (args[0], args[1])
            if self.counts(a, b):
                self.flops += 2 * a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
        return func(*args, **(kwargs or {}))

    def counts(self, a, b) -> bool:
        """Whether the product of a and b is counted (all of them here)."""
        return True

    @property
    def passes(self) -> float:
        return self.flops / self.unit


def count_passes(step, n, hidden, vocab) -> float:
    with GemmPasses(n, hidden, vocab) as counter:
        step()
    return counter.passes


def pass_batch():
    hs, w, labels = make_batch(pairs=2, seq_len=200, hidden=48, vocab=1000)
    n = int((shifted_targets(labels) != -100).sum())
    return hs.float(), w.float(), labels, n


@pytest.mark.parametrize("fused,passes", [(True, 3), (False, 4)])
def test_trainable_head_passes(fused, passes, one_thread):
    hs, w, labels, n = pass_batch()
    ref = precomputed_reference(hs.double(), w.double(), labels)
    h, weight = hs.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        fastdpo.FastDPOLoss(backend="torch", fused=fused)(h, weight, labels, **ref).loss.backward()

    assert count_passes(step, n, 48, 1000) == pytest.approx(passes, abs=0.01)


def test_trainable_head_with_reference_hidden_states_passes(one_thread):
    hs, w, labels, n = pass_batch()
    h, weight = hs.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        fastdpo.FastDPOLoss(backend="torch")(h, weight, labels, ref_hidden_states=hs + 0.1).loss.backward()

    assert count_passes(step, n, 48, 1000) <= 4.01


def frozen_head_steps(hs, w, labels, backend: str, fused: bool):
    """FastDPOLoss and linear_logprobs (any upstream loss) on a frozen head: a forward and backward each."""
    ref = precomputed_reference(hs.double(), w.double(), labels)
    targets = shifted_targets(labels)
    h = hs.clone().requires_grad_()

    def loss_step():
        fastdpo.FastDPOLoss(backend=backend, fused=fused)(h, w, labels, **ref).loss.backward()

    def logprobs_step():
        logps = fastdpo.linear_logprobs(h, w, targets, backend=backend, fused=fused)
        (logps.exp().sum() + logps.square().mean()).backward()

    return loss_step, logprobs_step


@pytest.mark.parametrize("fused,passes", [(True, 2), (False, 3)])
def test_frozen_head_passes(fused, passes, one_thread):
    hs, w, labels, n = pass_batch()
    for step in frozen_head_steps(hs, w, labels, "torch", fused):
        assert count_passes(step, n, 48, 1000) == pytest.approx(passes, abs=0.01)


def test_forward_without_gradients_is_one_pass(one_thread):
    hs, w, labels, n = pass_batch()
    with torch.no_grad():
        passes = count_passes(lambda: fastdpo.FastDPOLoss(backend="torch", reference_free=True)(hs, w, labels),
                              n, 48, 1000)
    assert passes == pytest.approx(1, abs=0.01)


# --- memory -----------------------------------------------------------------------------------------------------


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class LargestTensors(TorchDispatchMode):
    """Every tensor an op returns: the largest, and those shaped like the head."""

    def __init__(self, head_shape):
        super().__init__()
        self.largest, self.head_shaped_fp32, self.head_shape = 0, 0, tuple(head_shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            # (uint8: Triton's interpreter copies each kernel argument through a byte buffer)
            if (isinstance(t, torch.Tensor) and func.__name__.split(".")[0] not in ("detach", "alias")
                    and t.dtype != torch.uint8):
                self.largest = max(self.largest, t.numel())
                # Only tensors with storage of their own: views of the weight or of dW are no new memory, nor
                # is an in-place op's result (its storage is an argument's).
                if (tuple(t.shape) == self.head_shape and t.dtype == torch.float32 and t._base is None
                        and t.untyped_storage().data_ptr() not in _storages((args, kwargs))):
                    self.head_shaped_fp32 += 1
        return out


@pytest.mark.parametrize("frozen", [False, True])
def test_no_tokens_by_vocabulary_tensor_and_one_fp32_head_at_most(frozen, spy, one_thread):
    hs, w, labels = make_batch(pairs=3, seq_len=300, vocab=512)
    hs, w = hs.float(), w.float()
    vocab, tokens = w.shape[0], labels.numel()
    workspace = fitting_workspace(labels, vocab)  # just what the schedule needs
    assert workspace // 4 < tokens * vocab / 2
    ref = precomputed_reference(hs.double(), w.double(), labels)
    h, weight = hs.clone().requires_grad_(), w.clone().requires_grad_(not frozen)
    with LargestTensors(w.shape) as seen:
        fastdpo.FastDPOLoss(backend="torch", workspace_bytes=workspace)(h, weight, labels, **ref).loss.backward()
    assert spy.completed == (0 if frozen else 1)
    assert seen.largest <= max(workspace // 4, vocab * w.shape[1], tokens * w.shape[1])
    assert seen.largest < tokens * vocab
    assert seen.head_shaped_fp32 == (0 if frozen else 1)  # dW, which is the gradient itself in fp32


def test_a_second_backward_through_the_fused_pass_says_what_to_do(spy):
    hs, w, labels = make_batch(pairs=1, seq_len=30)
    h, weight, _ = leaves(hs, w, None)
    loss = fastdpo.FastDPOLoss(backend="torch", reference_free=True)(h, weight, labels).loss
    assert spy.completed == 1
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused=False"):
        loss.backward()


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_autocast_runs_the_head_in_the_autocast_dtype_on_every_route(frozen, spy):
    """Under bf16 autocast both fused routes cast the head as the two-pass path does: the same log-probs,
    loss and gradients, bit for bit (and the fused pass did run)."""
    hs, w, labels = make_batch(pairs=2, seq_len=40)

    def step(fused):
        h, weight, _ = leaves(hs, w, None, frozen=frozen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fastdpo.FastDPOLoss(backend="torch", fused=fused, reference_free=True)(h, weight, labels)
        out.loss.backward()
        return outputs(out), [t.grad for t in (h, weight) if t.grad is not None]

    (fused, fused_grads), (two_pass, two_pass_grads) = step(True), step(False)
    assert spy.completed == (0 if frozen else 1)
    for name, value in two_pass.items():
        assert torch.equal(fused[name], value), name
    assert len(fused_grads) == len(two_pass_grads) == (1 if frozen else 2)
    for got, want in zip(fused_grads, two_pass_grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5)
