"""Same inputs, same bits: log-probs independent of statistics, gradients, policy/reference role and backend
summation order; at the first DPO step (policy = reference) rewards are exactly 0, as in stock TRL."""

import importlib

import pytest
import torch
from helpers import DEVICE, as_reference, assert_close

import fastdpo
from fastdpo import reference

BACKENDS = ["torch", "triton"]


@pytest.fixture
def small_tiles(monkeypatch):
    """Blocks of 16 rows and 128-column slices: several token blocks, several slices per worker part."""
    chunked = importlib.import_module("fastdpo.chunked")
    monkeypatch.setattr(chunked, "TOKEN_BLOCK", 16)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 16 * 128)
    return chunked


def head_inputs(n=45, hidden=31, vocab=700, bias=False, far_row=False):
    h = torch.randn(n, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) / hidden**0.5
    b = torch.randn(vocab, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (n,))
    targets[torch.randperm(n)[:7]] = -100
    if far_row:
        # Row 0: its target is its least likely token, 60+ nats below its best one (exp(z - t) overflows float32).
        z = w @ h[0]
        h[0] *= 70.0 / float(z.max() - z.min())
        targets[0] = int(z.argmin())
    return h.float().to(DEVICE), w.float().to(DEVICE), None if b is None else b.float().to(DEVICE), targets.to(DEVICE)


def all_logps(h, w, b, targets, backend, **transform):
    """Log-probs for every combination of statistics on/off and gradients on/off."""
    results = {}
    for with_stats in (False, True):
        for grad in (False, True):
            hh, ww = (h.clone().requires_grad_(), w.clone().requires_grad_()) if grad else (h, w)
            with torch.set_grad_enabled(grad):
                out = fastdpo.linear_logprobs(hh, ww, targets, b, with_stats=with_stats, backend=backend, **transform)
            results[(with_stats, grad)] = (out.logps if with_stats else out).detach()
    return results


HEADS = {
    "linear": dict(),
    "scaled": dict(logit_scale=0.7, temperature=0.9),
    "bias": dict(bias=True),
    "softcap": dict(softcap=3.0),
}


@pytest.mark.parametrize("head", HEADS, ids=list(HEADS))
def test_torch_logps_same_bits_with_or_without_stats_and_grad(small_tiles, head):
    options = dict(HEADS[head])
    h, w, b, targets = head_inputs(bias=options.pop("bias", False))
    results = all_logps(h, w, b, targets, "torch", **options)
    first = results[(False, False)]
    for key, logps in results.items():
        assert torch.equal(logps, first), f"stats/grad {key} changed the log-probs"


def test_torch_rows_beyond_the_shift_fall_back_alone_and_exactly(small_tiles):
    """A row whose target is 60+ nats below its best logit goes through the online path: right values, the
    same bits with or without statistics, and the other rows keep their bits."""
    h, w, _, targets = head_inputs(far_row=True)
    results = all_logps(h, w, None, targets, "torch")
    for key, logps in results.items():
        assert torch.equal(logps, results[(False, False)]), f"stats/grad {key} changed the log-probs"
    assert results[(False, False)][0] < -55
    stats = fastdpo.linear_logprobs(h, w, targets, with_stats=True, backend="torch")
    expected = reference.token_stats(as_reference(h), as_reference(w), targets.cpu())
    for name in ("logps", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(stats, name), getattr(expected, name), 1e-5, name)
    assert torch.equal(stats.is_top1.cpu(), expected.is_top1)
    # The far row alone changes nothing for the others
    mild = targets.clone()
    mild[0] = -100
    alone = fastdpo.linear_logprobs(h, w, mild, backend="torch")
    assert torch.equal(alone[1:], results[(False, False)][1:])


def test_torch_shifted_statistics_match_the_reference(small_tiles):
    """Entropy, log sum p^2, mean logit and top-1 computed beside the shifted tiles, with a target tied for top-1
    (is_top1 must be False when an earlier column holds the same logit)."""
    h, w, _, targets = head_inputs(vocab=300)
    w[150] = w[20]  # column 150 duplicates column 20: a target at 150 that is the argmax is not top-1
    rows = (targets != -100).nonzero().squeeze(1)[:3]
    targets[rows] = 150
    h[rows] = w[150] * 40  # make 20/150 the best logits of these rows
    stats = fastdpo.linear_logprobs(h, w, targets, with_stats=True, backend="torch")
    expected = reference.token_stats(as_reference(h), as_reference(w), targets.cpu())
    for name in ("logps", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close(getattr(stats, name), getattr(expected, name), 1e-5, name)
    assert torch.equal(stats.is_top1.cpu(), expected.is_top1)
    assert not stats.is_top1[rows].any()
    targets[rows] = 20
    assert fastdpo.linear_logprobs(h, w, targets, with_stats=True, backend="torch").is_top1[rows].all()


def test_triton_logps_same_bits_with_or_without_stats_and_grad():
    """The Triton forward must give the same log-probs whether or not it computes the statistics."""
    pytest.importorskip("fastdpo.kernels.logprob_forward")
    h, w, _, targets = head_inputs(n=21, vocab=300)
    results = all_logps(h, w, None, targets, "triton")
    for key, logps in results.items():
        assert torch.equal(logps, results[(False, False)]), f"stats/grad {key} changed the log-probs"


def dpo_batch(pairs=3, seq_len=9, hidden=31, vocab=300):
    hs = torch.randn(2 * pairs, seq_len, hidden, device=DEVICE)
    w = torch.randn(vocab, hidden, device=DEVICE) / hidden**0.5
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), device=DEVICE)
    labels[:, :3] = -100
    labels[1, 6:] = -100
    return hs, w, labels


STEP0_OPTIONS = {
    "sigmoid": dict(),
    "token_metrics": dict(token_metrics=True),
    "wpo": dict(use_weighting=True),
    "ld_alpha": dict(ld_alpha=0.5, loss_type="apo_zero"),
    "average": dict(average_log_prob=True, label_smoothing=0.1),
    "mixed": dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], token_metrics=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", STEP0_OPTIONS, ids=list(STEP0_OPTIONS))
def test_first_step_rewards_are_exactly_zero(small_tiles, backend, options):
    """Policy = reference (hidden states given twice): rewards, margins and accuracies exactly 0."""
    if backend == "triton":
        pytest.importorskip("fastdpo.kernels.logprob_forward")
    hs, w, labels = dpo_batch()
    loss_fn = fastdpo.FastDPOLoss(backend=backend, **STEP0_OPTIONS[options])
    out = loss_fn(hs.clone().requires_grad_(), w.clone().requires_grad_(), labels, ref_hidden_states=hs.clone())
    for name in ("chosen_rewards", "rejected_rewards", "reward_margins", "reward_accuracies"):
        assert torch.equal(getattr(out, name), torch.zeros_like(getattr(out, name))), name
    # The precomputed route: the policy's own sequence log-probs given back as the reference
    if "ld_alpha" not in STEP0_OPTIONS[options]:
        again = loss_fn(hs.clone().requires_grad_(), w, labels, ref_chosen_logps=out.chosen_logps,
                        ref_rejected_logps=out.rejected_logps)
        assert torch.equal(again.chosen_rewards, torch.zeros_like(again.chosen_rewards))
        assert torch.equal(again.reward_accuracies, torch.zeros_like(again.reward_accuracies))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logps_are_one_torch_summation_on_every_backend(backend):
    """FastDPOLoss's sequence log-probs are torch's masked sum of the backend's token log-probs, bit for bit."""
    if backend == "triton":
        pytest.importorskip("fastdpo.kernels.logprob_forward")
    hs, w, labels = dpo_batch()
    targets = fastdpo.sequences.shifted_targets(labels)
    token_logps = fastdpo.linear_logprobs(hs, w, targets, backend=backend)
    sums = torch.where(targets != -100, token_logps, 0).sum(-1)
    out = fastdpo.FastDPOLoss(backend=backend)(hs.requires_grad_(), w, labels, ref_chosen_logps=torch.zeros(3),
                                               ref_rejected_logps=torch.zeros(3))
    assert torch.equal(torch.cat([out.chosen_logps, out.rejected_logps]), sums)


@pytest.mark.parametrize("overrides", [dict(), dict(bf16=True), dict(ld_alpha=0.5)], ids=["sigmoid", "bf16-autocast",
                                                                                          "ld_alpha"])
def test_patched_trl_first_step_rewards_are_exactly_stock(overrides):
    """TRL with a reference that is an exact copy of the policy: stock logs rewards of exactly 0 and accuracies 0
    at the first step; patched must log the same (its policy head computes statistics, its reference head not)."""
    pytest.importorskip("trl")
    import copy
    import warnings

    from tiny_models import cpu_dpo_config, offline_env, tiny_llama, tiny_preference_dataset, tiny_tokenizer
    from trl import DPOTrainer

    offline_env()

    def first_step_log():
        policy = tiny_llama(0)
        config = dict(per_device_train_batch_size=4, max_steps=1, learning_rate=2e-2, logging_steps=1, data_seed=0,
                      dataloader_num_workers=0, **overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=cpu_dpo_config("step0_", **config),
                                 train_dataset=tiny_preference_dataset(8, seed=0), processing_class=tiny_tokenizer())
            trainer.train()
        return next(entry for entry in trainer.state.log_history if "loss" in entry)

    stock = first_step_log()
    with fastdpo.patch_trl():
        patched = first_step_log()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(stock[key]) == 0.0, f"stock {key}"
        assert float(patched[key]) == float(stock[key]), f"{key}: stock {stock[key]} vs patched {patched[key]}"


@pytest.mark.parametrize("head", ["linear", "softcap"])
def test_torch_worker_threads_give_the_bits_of_one_thread_running_the_same_parts(small_tiles, monkeypatch, head):
    """The vocabulary parts of a block run on worker threads and are combined in a fixed order: running the same
    parts one after the other on the calling thread must give the same forward and backward bits."""
    chunked = small_tiles
    options = HEADS[head]
    h, w, b, targets = head_inputs(n=60, bias=False)

    def step():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        stats = fastdpo.linear_logprobs(hh, ww, targets, with_stats=True, backend="torch", **options)
        (stats.logps * torch.linspace(-1, 1, targets.numel()).view(targets.shape)).sum().backward()
        return (*stats, hh.grad, ww.grad)

    monkeypatch.setattr(chunked.Workers, "count", staticmethod(lambda n_slices: min(3, n_slices)))
    threaded = step()
    monkeypatch.setattr(chunked.Workers, "map", classmethod(lambda cls, fn, parts: [fn(part) for part in parts]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the workers: torch's reductions split their work by thread count
    try:
        sequential = step()
    finally:
        torch.set_num_threads(threads)
    for name, got, want in zip(("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "dX", "dW"),
                               threaded, sequential):
        assert torch.equal(got, want), name


def test_torch_workers_leave_the_thread_count_alone(small_tiles, monkeypatch):
    """Workers run single-threaded without changing the caller's torch thread count, or that of threads started
    later."""
    import threading

    chunked = small_tiles
    monkeypatch.setattr(chunked.Workers, "count", staticmethod(lambda n_slices: min(2, n_slices)))
    monkeypatch.setattr(chunked.Workers, "_pool_key", None)  # start (and initialise) fresh workers here
    before = torch.get_num_threads()
    h, w, _, targets = head_inputs()
    fastdpo.linear_logprobs(h.requires_grad_(), w, targets, backend="torch").sum().backward()
    assert torch.get_num_threads() == before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]


def test_torch_all_ignored_with_stats():
    h, w, _, _ = head_inputs(n=5)
    stats = fastdpo.linear_logprobs(h, w, torch.full((5,), -100, device=DEVICE), with_stats=True, backend="torch")
    assert stats.is_top1.dtype == torch.bool and not stats.is_top1.any()
    assert torch.equal(stats.logps, torch.zeros(5, device=DEVICE))
