"""Every bad input becomes a ValueError that names the argument and what was expected."""

import pytest
import torch

import fastdpo


def batch(pairs=2, seq_len=6, hidden=16, vocab=50):
    hs = torch.randn(2 * pairs, seq_len, hidden)
    w = torch.randn(vocab, hidden)
    labels = torch.randint(0, vocab, (2 * pairs, seq_len))
    labels[:, :2] = -100
    refs = dict(ref_chosen_logps=torch.zeros(pairs), ref_rejected_logps=torch.zeros(pairs))
    return hs, w, labels, refs


def dpo(**overrides):
    hs, w, labels, refs = batch()
    args = dict(hidden_states=hs, lm_head_weight=w, labels=labels, **refs)
    args.update(overrides)
    return fastdpo.FastDPOLoss(backend="torch")(**args)


@pytest.mark.parametrize("overrides,match", [
    (dict(hidden_states=torch.randn(3, 6, 16), labels=torch.zeros(3, 6, dtype=torch.long)), "even number"),
    (dict(hidden_states=torch.randn(0, 6, 16), labels=torch.zeros(0, 6, dtype=torch.long)), "empty batch"),
    (dict(hidden_states=torch.randn(4, 16)), r"hidden_states must be a \[2B, T, H\]"),
    (dict(labels=torch.zeros(4, 5, dtype=torch.long)), "labels must have shape"),
    (dict(lm_head_weight=torch.randn(50, 17)), "hidden size mismatch"),
    (dict(lm_head_weight=torch.randn(50, 16, dtype=torch.float64)), "weight dtype"),
    (dict(ref_chosen_logps=torch.zeros(3)), "ref_chosen_logps must have shape"),
    (dict(ref_rejected_logps=None), "ref_rejected_logps must have shape"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None), "a reference is required"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden_states=torch.randn(4, 5, 16)),
     "ref_hidden_states must have shape"),
    (dict(labels=torch.full((4, 6), 50)), r"must be in \[0, 50\)"),
    (dict(labels=torch.full((4, 6), -3)), r"must be in \[0, 50\)"),
    (dict(lm_head_bias=torch.zeros(49)), "bias must have shape"),
    (dict(labels=torch.zeros(4, 6)), "integer"),
])
def test_bad_dpo_inputs(overrides, match):
    with pytest.raises(ValueError, match=match):
        dpo(**overrides)


def test_a_given_reference_is_checked_even_when_the_loss_needs_none():
    hs, w, labels, _ = batch()
    with pytest.raises(ValueError, match="ref_chosen_logps must have shape"):
        fastdpo.FastDPOLoss(loss_type="simpo", backend="torch")(hs, w, labels, ref_chosen_logps=torch.zeros(3),
                                                                ref_rejected_logps=torch.zeros(3))
    out = fastdpo.FastDPOLoss(loss_type="simpo", backend="torch")(hs, w, labels)  # none needed, none given
    assert torch.isfinite(out.loss)


def test_labels_out_of_range_are_caught_under_their_own_name():
    hs, w, labels, refs = batch()
    labels[1, 4] = 10_000
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        fastdpo.FastDPOLoss(backend="torch")(hs, w, labels, **refs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="nonsense"), "loss_type"),
    (dict(label_smoothing=0.7), "label_smoothing"),
    (dict(backend="cuda-magic"), "backend must be one of"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdpo.FastDPOLoss(**kwargs)(*batch()[:3], **batch()[3])


def test_bad_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "fast-please")
    with pytest.raises(ValueError, match="FASTDPO_BACKEND must be one of"):
        fastdpo.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))


def test_triton_on_cpu_tensors_without_the_interpreter(monkeypatch):
    # Triton reads TRITON_INTERPRET when it is first imported and when kernels are decorated: do both
    # under the suite's setting before switching it off here.
    pytest.importorskip("fastdpo.kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fastdpo.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="triton")


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=torch.tensor([0, 1])), "targets must have shape"),
    (dict(targets=torch.tensor([0, 1, 5])), r"must be in \[0, 5\)"),
    (dict(weight=torch.randn(5)), r"weight must be \[vocab, hidden\]"),
    (dict(weight=torch.randn(0, 4)), "at least one vocabulary row"),
    (dict(bias=torch.zeros(5, dtype=torch.float16)), "bias dtype"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(softcap=-1.0), "softcap must be None or > 0"),
    (dict(hidden=torch.randn(3, 4, dtype=torch.float64), weight=torch.randn(5, 4, dtype=torch.float64),
          backend="triton"), "backend='triton' supports"),
    (dict(hidden=torch.zeros(3, 4, dtype=torch.long)), "floating point"),
    (dict(weight=torch.randn(5, 4, device="meta")), "one device"),
])
def test_bad_logprob_inputs(kwargs, match):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), targets=torch.tensor([0, 1, 2]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fastdpo.linear_logprobs(**args)
