"""bf16 on CUDA against the float64 oracle, at sizes the interpreter cannot reach (skipped without a GPU)."""

import pytest
import torch
from helpers import as_reference, assert_close, random_targets

import fastdpo
from fastdpo import reference

pytestmark = pytest.mark.gpu

# bf16 inputs, fp32 accumulation: logps carry the error of bf16-rounded d_logits only in the grads.
BF16_TOL = 2e-2


@pytest.mark.parametrize("tokens,hidden,vocab", [(1000, 256, 32000), (333, 96, 50257), (64, 4096, 128256)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_logprobs_and_grads(tokens, hidden, vocab, softcap):
    h = torch.randn(tokens, hidden, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") * hidden**-0.5 * 3).bfloat16().requires_grad_()
    targets = random_targets((tokens,), vocab).cuda()
    logps = fastdpo.linear_logprobs(h, w, targets, softcap=softcap, backend="triton")
    h_ref, w_ref = as_reference(h), as_reference(w)
    expected = reference.token_logprobs(h_ref, w_ref, targets.cpu(), softcap=softcap)
    assert_close(logps, expected, 1e-3, "logps")
    upstream = torch.randn(tokens, dtype=torch.float64)
    (logps * upstream.cuda().float()).sum().backward()
    (expected * upstream).sum().backward()
    assert_close(h.grad, h_ref.grad, BF16_TOL, "grad hidden")
    assert_close(w.grad, w_ref.grad, BF16_TOL, "grad weight")


def test_bf16_dpo_loss_with_computed_reference():
    pairs, seq_len, hidden, vocab = 4, 300, 512, 32768
    hs = torch.randn(2 * pairs, seq_len, hidden, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") * hidden**-0.5 * 3).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), device="cuda")
    labels[:, :100] = -100
    ref_hs = (hs.detach().float() + 0.1 * torch.randn_like(hs, dtype=torch.float32)).bfloat16()
    out = fastdpo.FastDPOLoss(beta=0.1)(hs, w, labels, ref_hidden_states=ref_hs)
    h_ref, w_ref = as_reference(hs), as_reference(w)
    expected = reference.dpo_loss(h_ref, w_ref, labels.cpu(), ref_hidden_states=ref_hs.double().cpu(), beta=0.1)
    assert_close(out.chosen_logps, expected.chosen_logps, 1e-3, "chosen logps")
    assert_close(out.loss.reshape(1), expected.loss.reshape(1), 1e-2, "loss")
    out.loss.backward()
    expected.loss.backward()
    assert_close(hs.grad, h_ref.grad, BF16_TOL, "grad hidden")
    assert_close(w.grad, w_ref.grad, BF16_TOL, "grad weight")


def _llama_like_step(tokens=4096, hidden=4096, vocab=128256, workspace_bytes=None):
    h = torch.randn(tokens, hidden, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") * hidden**-0.5 * 3).bfloat16().requires_grad_()
    targets = random_targets((tokens,), vocab).cuda()
    return h, w, targets


def test_bf16_step_is_bitwise_reproducible():
    h, w, targets = _llama_like_step(tokens=2048, hidden=1024, vocab=50257)
    runs = []
    for _ in range(2):
        h.grad = w.grad = None
        logps = fastdpo.linear_logprobs(h, w, targets, backend="triton", workspace_bytes=64 << 20)
        (logps * torch.linspace(-1, 1, logps.numel(), device="cuda")).sum().backward()
        runs.append((logps.detach(), h.grad, w.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_bf16_step_memory_is_gradients_plus_workspace():
    """Peak above the inputs: dW and dX in bf16, the workspace, O(n x H) fp32 and the partials table;
    never an fp32 [V, H] buffer (which alone would be 2.1 GB here)."""
    tokens, hidden, vocab, workspace = 4096, 4096, 128256, 256 << 20
    h, w, targets = _llama_like_step(tokens, hidden, vocab)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fastdpo.linear_logprobs(h, w, targets, backend="triton", workspace_bytes=workspace).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    gradients = 2 * (vocab * hidden + tokens * hidden)
    n_scored = int((targets != -100).sum())
    fp32_rows = 3 * 4 * n_scored * hidden  # dX accumulator, one chunk's product, the scatter's cast
    table = 2 * 4 * n_scored * (vocab // 128 + 1)
    assert peak <= gradients + workspace + fp32_rows + table + (64 << 20), peak / 2**20


@pytest.mark.parametrize("tokens,hidden,vocab", [(1000, 256, 32000), (2100, 96, 50257)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_frozen_head_route(tokens, hidden, vocab, softcap):
    """A frozen head (the frozen route, fastdpo.triton_fused.FrozenStoredLogits; 2100 tokens, ~1,470 scored: two
    1,024-row blocks, the last partial): the two-pass route's log-probs bit for bit, dX against float64, runs
    repeat bitwise."""
    h = torch.randn(tokens, hidden, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") * hidden**-0.5 * 3).bfloat16()
    targets = random_targets((tokens,), vocab).cuda()
    upstream = torch.randn(tokens, dtype=torch.float64)
    runs = []
    for fused in (True, True, False):
        h.grad = None
        logps = fastdpo.linear_logprobs(h, w, targets, softcap=softcap, backend="triton", fused=fused)
        (logps * upstream.cuda().float()).square().sum().backward()
        runs.append((logps.detach(), h.grad))
    (logps, grad), (again, grad_again), (two_pass, _) = runs
    assert torch.equal(logps, two_pass) and torch.equal(again, two_pass)
    assert torch.equal(grad, grad_again)
    h_ref = as_reference(h)
    expected = reference.token_logprobs(h_ref, w.double().cpu(), targets.cpu(), softcap=softcap)
    (expected * upstream).square().sum().backward()
    assert_close(grad, h_ref.grad, BF16_TOL, "grad hidden")
