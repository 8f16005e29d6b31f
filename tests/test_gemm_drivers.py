"""The dense kernels' two GEMM drivers (kernels/config.persistent_config) give the same bits.

The persistent driver reads compacted X rows and W through tensor descriptors and may hold two
vocabulary tiles in one accumulator (SUBTILES = 2, the last right half past the vocabulary's end);
the pointer driver gathers X rows by index, one tile per program. Same partition, K order and
epilogue: the forward's partials table, target logits, stored exp-space tiles and target-free sums, and the
backward's d_logits must match bit for bit, and both must match the float64 reference.
"""

import pytest
import torch
from helpers import DEVICE

from fastdpo.kernels import config, logprob_backward, logprob_forward
from fastdpo.transform import LogitTransform

TOKENS, SCORED, HIDDEN, VOCAB = 70, 37, 48, 150  # 5 interpreter tiles of 32: the last GEMM tile is half empty
TRANSFORM = LogitTransform(temperature=0.7, softcap=5.0, logit_scale=0.9)


def drivers(monkeypatch, name):
    """Select a driver: "pointer", or "persistent" with 1 or 2 subtiles."""
    monkeypatch.setattr(config, "PERSISTENT_TMA", name != "pointer")
    if name == "persistent1":
        one = lambda *args, **kwargs: dict(config.persistent_config(*args, **kwargs), SUBTILES=1)  # noqa: E731
        monkeypatch.setattr(logprob_forward, "persistent_config", one)
        monkeypatch.setattr(logprob_backward, "persistent_config", one)


def operands():
    hidden = torch.randn(TOKENS, HIDDEN, device=DEVICE).half()
    weight = (torch.randn(VOCAB, HIDDEN, device=DEVICE) * HIDDEN**-0.5 * 3).half()
    bias = torch.randn(VOCAB, device=DEVICE)
    rows = torch.randperm(TOKENS, device=DEVICE)[:SCORED]
    targets = torch.randint(0, VOCAB, (SCORED,), device=DEVICE)
    return hidden, weight, bias, rows, targets


def run(monkeypatch, driver, args, aligned_slot):
    drivers(monkeypatch, driver)
    hidden, weight, bias, rows, targets = args
    width = VOCAB + 2 if aligned_slot else VOCAB + 1  # 16-byte fp16 rows: the descriptor store; else pointers
    slot = torch.full((SCORED, width), float("nan"), device=DEVICE, dtype=torch.float16)[:, :VOCAB]
    table, target_logit, excl = logprob_forward.logprob_forward(
        hidden, weight, bias, rows, targets, transform=TRANSFORM, with_stats=True, slot=slot)
    lse = torch.logsumexp(table[0] + torch.log(table[1]), dim=0)
    grad = torch.linspace(-1, 1, SCORED, device=DEVICE)
    d_logits = torch.zeros(SCORED, 96, device=DEVICE, dtype=torch.float16)  # a chunk of tiles 2-4
    logprob_backward.logits_grad(hidden, weight, bias, rows, targets, lse, grad, d_logits, 64, transform=TRANSFORM)
    return dict(table=table, target_logit=target_logit, excl=excl, slot=slot, d_logits=d_logits)


@pytest.mark.parametrize("aligned_slot", [True, False], ids=["slot-descriptor", "slot-pointers"])
def test_drivers_give_the_same_bits(monkeypatch, aligned_slot):
    args = operands()
    results = {driver: run(monkeypatch, driver, args, aligned_slot)
               for driver in ("pointer", "persistent1", "persistent2")}
    for name, expected in results["pointer"].items():
        for driver in ("persistent1", "persistent2"):
            assert torch.equal(results[driver][name], expected), f"{name}: {driver} differs from the pointer driver"


def test_persistent_driver_matches_the_reference(monkeypatch):
    hidden, weight, bias, rows, targets = args = operands()
    out = run(monkeypatch, "persistent2", args, aligned_slot=True)
    raw = hidden[rows].double() @ weight.double().T + bias.double()
    z = TRANSFORM.softcap * torch.tanh(raw * TRANSFORM.logit_scale / TRANSFORM.softcap) / TRANSFORM.temperature
    assert torch.allclose(out["target_logit"].double(), z.gather(1, targets[:, None])[:, 0], atol=1e-5)
    block_v = config.gemm_config(torch.float16, None)["BLOCK_V"]
    tile_max = torch.stack([z[:, c:c + block_v].max(1).values for c in range(0, VOCAB, block_v)])
    assert torch.allclose(out["table"][0].double(), tile_max, atol=1e-5)
    # The slot: each tile in exp space, exp(z - the tile's row maximum), in fp16 (relative 2^-11).
    exp_space = torch.exp(z - tile_max.repeat_interleave(block_v, dim=0)[:VOCAB].T)
    assert torch.allclose(out["slot"].double(), exp_space, atol=1e-6, rtol=1e-3)


def test_operands_that_tma_cannot_read_give_the_same_bits(monkeypatch):
    """A weight whose rows are not 16-byte strided (a column slice) is copied for the descriptors:
    the driver, and so the bits, never depend on where the operands lie in memory."""
    hidden, weight, bias, rows, targets = args = operands()
    padded = torch.zeros(VOCAB, HIDDEN + 1, device=DEVICE, dtype=weight.dtype)
    padded[:, :HIDDEN] = weight
    strided = padded[:, :HIDDEN]
    assert (strided.stride(0) * strided.element_size()) % 16
    expected = run(monkeypatch, "persistent2", args, aligned_slot=True)
    got = run(monkeypatch, "persistent2", (hidden, strided, bias, rows, targets), aligned_slot=True)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
