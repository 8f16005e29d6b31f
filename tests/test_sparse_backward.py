"""grad_tolerance: the budgeted block-sparse backward (fastdpo.sparse_plan, kernels/sparse_backward.py).

Checked three ways: the kernels compute exactly the pairs the plan keeps (against a float64 backward
with the dropped pairs zeroed), the dropped part stays within the stated bound (random, LM-like and
adversarial inputs), and a flat distribution, where every tile holds more than the budget, drops
nothing.
"""

import importlib

import pytest
import torch
from helpers import DEVICE, leaf

import fastdpo
from fastdpo import reference, sparse_plan
from fastdpo.kernels.config import device_capability, gemm_config

triton_head = importlib.import_module("fastdpo.triton_head")
# The Triton tile of fp32 inputs on this device (16 x 32 in the interpreter, 64 x 64 on a GPU).
_TILE = gemm_config(torch.float32, device_capability(DEVICE), 48)
BLOCK_M, BLOCK_V = _TILE["BLOCK_M"], _TILE["BLOCK_V"]


def lm_like(tokens=70, hidden=48, vocab=700, peak=3.0, seed_targets=64):
    """A Zipf-like base falling with the id plus a context-specific direction: a few nats of entropy."""
    w = torch.randn(vocab, hidden, dtype=torch.float64) / hidden**0.5
    w[:, 0] = -0.8 * torch.log1p(torch.arange(vocab, dtype=torch.float64))
    targets = torch.randint(0, seed_targets, (tokens,))
    h = peak * w[targets] * hidden**0.5 / 2 + 0.3 * torch.randn(tokens, hidden, dtype=torch.float64)
    h[:, 0] = 1.0
    return h, w, targets


def run(h0, w0, targets, upstream, tolerance, bias=True, workspace_bytes=None, backend="triton", **transform):
    h, w = leaf(h0, torch.float32), leaf(w0, torch.float32)
    b = leaf(torch.linspace(-0.5, 0.5, w0.shape[0], dtype=torch.float64), torch.float32) if bias else None
    logps = fastdpo.linear_logprobs(h, w, targets.to(DEVICE), b, backend=backend, grad_tolerance=tolerance,
                                    workspace_bytes=workspace_bytes, **transform)
    (logps * upstream.to(logps)).sum().backward()
    return logps.detach(), h.grad.double().cpu(), w.grad.double().cpu(), None if b is None else b.grad.double().cpu()


def expected_with_dropped_pairs_zeroed(h0, w0, targets, upstream, kept, bias):
    """float64 backward of the same head with d_logits zeroed on the pairs the plan drops."""
    b = torch.linspace(-0.5, 0.5, w0.shape[0], dtype=torch.float64) if bias else torch.zeros(w0.shape[0], dtype=torch.float64)
    logits = h0 @ w0.T + b
    probs = torch.softmax(logits, dim=-1)
    d = upstream[:, None] * (torch.nn.functional.one_hot(targets, w0.shape[0]).double() - probs)
    keep = kept.repeat_interleave(BLOCK_M, 0)[: h0.shape[0]].repeat_interleave(BLOCK_V, 1)[:, : w0.shape[0]]
    d = d * keep
    return d @ w0, d.T @ h0, d.sum(0)


@pytest.fixture(autouse=True)
def always_sparse(monkeypatch):
    # Small test problems keep many pairs: make the sparse path run whatever the kept fraction.
    monkeypatch.setattr(triton_head, "SPARSE_BREAK_EVEN", 1.0)


@pytest.mark.parametrize("workspace_bytes", [None, BLOCK_M * BLOCK_V * 4 * 7], ids=["one-chunk", "chunks-of-7-pairs"])
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_compute_exactly_the_kept_pairs(workspace_bytes, bias):
    h0, w0, targets = lm_like()
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    tolerance = 2**-6
    logps, dx, dw, db = run(h0, w0, targets, upstream, tolerance, bias=bias, workspace_bytes=workspace_bytes)
    b = torch.linspace(-0.5, 0.5, w0.shape[0], dtype=torch.float64) if bias else None
    stats = reference.token_stats(h0, w0, targets, b)
    tile_lse = torch.stack([torch.logsumexp((h0 @ w0[j:j + BLOCK_V].T) + (0 if b is None else b[j:j + BLOCK_V]), -1)
                            for j in range(0, w0.shape[0], BLOCK_V)])
    lse = stats.logps.new_tensor(0) + (torch.logsumexp(h0 @ w0.T + (0 if b is None else b), -1))
    kept = sparse_plan.kept_pairs(tile_lse, lse, targets, BLOCK_M, BLOCK_V, tolerance)
    assert 0 < kept.float().mean() < 1, "the plan kept all or nothing: the check would be vacuous"
    want_dx, want_dw, want_db = expected_with_dropped_pairs_zeroed(h0, w0, targets, upstream, kept, bias)
    for got, want, name in ((dx, want_dx, "dx"), (dw, want_dw, "dw")) + (((db, want_db, "db"),) if bias else ()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def bound_check(h0, w0, targets, upstream, tolerance, backend="triton", **transform):
    """Sparse minus dense, against |g| tolerance max ||W_v|| (dX) and tolerance sum_i |g_i x_i| (dW)."""
    _, dx, dw, _ = run(h0, w0, targets, upstream, 0.0, bias=False, backend=backend, **transform)
    _, sdx, sdw, _ = run(h0, w0, targets, upstream, tolerance, bias=False, backend=backend, **transform)
    slack = 1e-5  # float32 rounding of the kept terms
    dx_bound = upstream.abs()[:, None] * tolerance * w0.norm(dim=1).max()
    dw_bound = tolerance * (upstream.abs()[:, None] * h0.abs()).sum(0)
    assert ((sdx - dx).norm(dim=1) <= dx_bound[:, 0] + slack).all()
    assert ((sdw - dw).abs() <= dw_bound[None, :] + slack).all()
    return dx, sdx


@pytest.mark.parametrize("tolerance", [2**-10, 2**-6, 2**-3])
def test_error_within_the_bound_on_lm_like_inputs(tolerance):
    h0, w0, targets = lm_like()
    dx, sdx = bound_check(h0, w0, targets, torch.randn(targets.shape, dtype=torch.float64), tolerance)
    if tolerance >= 2**-6:
        assert not torch.equal(dx, sdx), "nothing was skipped: the bound check would be vacuous"


def test_error_within_the_bound_on_random_inputs_with_softcap():
    h0 = torch.randn(50, 40, dtype=torch.float64)
    w0 = torch.randn(500, 40, dtype=torch.float64) * 0.5
    targets = torch.randint(0, 500, (50,))
    bound_check(h0, w0, targets, torch.randn(50, dtype=torch.float64), 2**-4, softcap=6.0)


def test_adversarial_many_tiles_just_under_the_budget():
    """Every non-target tile of a row holds just under the budget: one may drop, never two."""
    vocab, hidden, tokens, tolerance = 16 * BLOCK_V, 16, 16, 2**-5
    tiles = vocab // BLOCK_V
    # logits: the target tile takes the rest; each other tile holds mass 0.9 * tolerance.
    mass_per_tile = 0.9 * tolerance
    target_mass = 1 - (tiles - 1) * mass_per_tile
    logits = torch.full((tokens, vocab), float(torch.log(torch.tensor(mass_per_tile / BLOCK_V))), dtype=torch.float64)
    logits[:, :BLOCK_V] = float(torch.log(torch.tensor(target_mass / BLOCK_V)))
    # a head that reproduces these logits exactly: W = identity-like on one-hot hidden features
    w0 = torch.zeros(vocab, hidden, dtype=torch.float64)
    w0[:, 0] = logits[0]
    h0 = torch.zeros(tokens, hidden, dtype=torch.float64)
    h0[:, 0] = 1.0
    targets = torch.randint(0, BLOCK_V, (tokens,))
    upstream = torch.randn(tokens, dtype=torch.float64)
    dx, sdx = bound_check(h0, w0, targets, upstream, tolerance)
    _, _, sdw, _ = run(h0, w0, targets, upstream, tolerance, bias=False)
    dropped_tiles = [j for j in range(1, tiles) if torch.equal(sdw[j * BLOCK_V:(j + 1) * BLOCK_V], torch.zeros(BLOCK_V, hidden, dtype=torch.float64))]
    assert len(dropped_tiles) == 1, dropped_tiles


def flat_inputs(vocab, hidden=16, tokens=40):
    """Logits within 1e-3 of each other: every tile holds its share, 1/tiles, of each row's mass."""
    h0 = torch.zeros(tokens, hidden, dtype=torch.float64)
    h0[:, 0] = 1.0
    w0 = 1e-3 * torch.randn(vocab, hidden, dtype=torch.float64)
    return h0, w0, torch.randint(0, vocab, (tokens,)), torch.randn(tokens, dtype=torch.float64)


def test_flat_distribution_drops_nothing():
    """Every tile holds 1/tiles of the mass, above the budget: the result is the dense one, exactly."""
    vocab = 640
    h0, w0, targets, upstream = flat_inputs(vocab)
    tolerance = 0.5 / (vocab // BLOCK_V)  # every tile holds about twice the budget
    dense = run(h0, w0, targets, upstream, 0.0)
    sparse = run(h0, w0, targets, upstream, tolerance)
    # Every pair kept: the sparse kernels sum the same terms as the dense GEMMs, in another order.
    for a, b in zip(dense[1:], sparse[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


def test_logps_do_not_depend_on_the_tolerance():
    h0, w0, targets = lm_like()
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    assert torch.equal(run(h0, w0, targets, upstream, 0.0)[0], run(h0, w0, targets, upstream, 2**-4)[0])


def test_plan_keeps_target_tiles_and_respects_every_rows_budget():
    BLOCK_M, BLOCK_V = 16, 32  # the planning function alone: any tile; small blocks leave something to drop
    n, tiles = 37, 9
    tile_lse = torch.randn(tiles, n) * 3
    tile_lse[0] += 6  # the targets' tile holds most of the mass, as in a trained model
    lse = torch.logsumexp(tile_lse, 0)
    targets = torch.randint(0, BLOCK_V, (n,))
    targets[-1] = 5 * BLOCK_V  # and one row's target elsewhere: that tile is kept for its block
    tolerance = 0.05
    kept = sparse_plan.kept_pairs(tile_lse, lse, targets, BLOCK_M, BLOCK_V, tolerance)
    mass = torch.exp(tile_lse - lse)  # [tiles, n]
    row_block = torch.arange(n) // BLOCK_M
    dropped_mass = (mass * ~kept[row_block].T).sum(0)
    assert (dropped_mass <= tolerance + 1e-7).all()
    assert kept[row_block, targets // BLOCK_V].all()
    assert not kept.all(), "nothing dropped: the check would be vacuous"


# --- the CPU path: the same budget over its (token block, vocabulary slice) tiles -----------------------------------


@pytest.fixture
def small_cpu_tiles(monkeypatch):
    """Blocks of 16 rows and 128-column slices, so that small problems have many tiles to skip."""
    chunked = importlib.import_module("fastdpo.chunked")
    monkeypatch.setattr(chunked, "TOKEN_BLOCK", 16)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 16 * 128)


@pytest.mark.parametrize("transform", [{}, {"softcap": 8.0}], ids=["linear", "softcap"])
@pytest.mark.parametrize("tolerance", [2**-10, 2**-5])
def test_cpu_error_within_the_bound(small_cpu_tiles, transform, tolerance):
    h0, w0, targets = lm_like(tokens=70, hidden=48, vocab=1500)
    dx, sdx = bound_check(h0, w0, targets, torch.randn(targets.shape, dtype=torch.float64), tolerance,
                          backend="torch", **transform)
    if tolerance >= 2**-5:
        assert not torch.equal(dx, sdx), "nothing was skipped: the bound check would be vacuous"


def test_cpu_flat_distribution_drops_nothing(small_cpu_tiles):
    vocab = 1280
    h0, w0, targets, upstream = flat_inputs(vocab)
    tolerance = 0.5 / (vocab // 128)  # every slice holds about twice the budget
    dense = run(h0, w0, targets, upstream, 0.0, backend="torch", bias=False)
    sparse = run(h0, w0, targets, upstream, tolerance, backend="torch", bias=False)
    for a, b in zip(dense[:3], sparse[:3]):
        assert torch.equal(a, b)


def test_cpu_logps_do_not_depend_on_the_tolerance(small_cpu_tiles):
    h0, w0, targets = lm_like(tokens=40, hidden=48, vocab=700)
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    assert torch.equal(run(h0, w0, targets, upstream, 0.0, backend="torch", bias=False)[0],
                       run(h0, w0, targets, upstream, 2**-4, backend="torch", bias=False)[0])
