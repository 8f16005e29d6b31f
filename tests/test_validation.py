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
    pytest.importorskip("fastdpo.kernels.logprob_forward")
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


# --- argument names as the caller wrote them ------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    (dict(hidden_states=torch.randn(4, 6, 16, 2)), r"hidden_states must be a \[2B, T, H\].*got shape \(4, 6, 16, 2\)"),
    (dict(hidden_states=torch.randn(3, 6, 16), labels=torch.zeros(3, 6, dtype=torch.long)), r"got 3 \(shape"),
    (dict(lm_head_weight=torch.randn(50, 17)), r"hidden_states has 16 features .* lm_head_weight expects 17"),
    (dict(lm_head_weight=torch.randn(50)), r"lm_head_weight must be \[vocab, hidden\], got shape \(50,\)"),
    (dict(lm_head_bias=torch.zeros(49)), r"lm_head_bias must have shape \(50,\), got \(49,\)"),
    (dict(labels=torch.zeros(4, 6)), "labels must be an integer tensor"),
    (dict(hidden_states=torch.randn(4, 6, 0), lm_head_weight=torch.randn(50, 0)),
     "hidden_states must have at least one"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden_states=torch.randn(4, 6, 17)),
     r"ref_hidden_states has 17 features .* lm_head_weight expects 16"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden_states=torch.randn(4, 6, 16),
          ref_lm_head_weight=torch.randn(50, 15)),
     r"ref_hidden_states has 16 features .* ref_lm_head_weight expects 15"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden_states=torch.randn(4, 6, 16),
          ref_lm_head_weight=torch.randn(40, 16), labels=torch.full((4, 6), 45)), r"labels must be in \[0, 40\)"),
    (dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden_states=torch.randn(4, 6, 16, dtype=torch.float64)),
     r"lm_head_weight dtype torch.float32 must match ref_hidden_states dtype torch.float64"),
])
def test_messages_name_the_arguments_of_fastdpoloss(overrides, match):
    with pytest.raises(ValueError, match=match):
        dpo(**overrides)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=torch.randn(3, 0), weight=torch.randn(5, 0)), r"hidden must have at least one hidden feature, got "
                                                               r"shape \(3, 0\)"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0])), "targets must be an integer tensor"),
    (dict(weight=torch.randn(5, 3)), r"hidden has 4 features .* weight expects 3"),
])
def test_messages_name_the_arguments_of_linear_logprobs(kwargs, match):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), targets=torch.tensor([0, 1, 2]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fastdpo.linear_logprobs(**args)


@pytest.mark.parametrize("name", ["hidden_states", "lm_head_weight", "labels", "lm_head_bias", "ref_chosen_logps",
                                  "ref_hidden_states"])
def test_a_list_for_a_tensor_is_a_type_error_naming_it(name):
    hs, w, labels, refs = batch()
    args = dict(hidden_states=hs, lm_head_weight=w, labels=labels, **refs)
    if name == "ref_hidden_states":
        args.update(ref_chosen_logps=None, ref_rejected_logps=None)
    args[name] = [[0.0, 1.0]]
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
        fastdpo.FastDPOLoss(backend="torch")(**args)
    with pytest.raises(ValueError):  # every bad input is also a ValueError
        fastdpo.FastDPOLoss(backend="torch")(**args)


@pytest.mark.parametrize("name", ["hidden", "weight", "targets", "bias"])
def test_a_list_for_a_tensor_of_linear_logprobs(name):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), targets=torch.tensor([0, 1, 2]))
    args[name] = [0, 1, 2]
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
        fastdpo.linear_logprobs(**args)


@pytest.mark.parametrize("option", ["logit_scale", "temperature", "softcap"])
@pytest.mark.parametrize("value", [float("nan"), 0.0, float("inf"), -1.0])
def test_logit_transform_must_be_finite_and_positive(option, value):
    with pytest.raises(ValueError, match=f"{option} must be"):
        fastdpo.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), **{option: value})
    with pytest.raises(ValueError, match=f"{option} must be"):
        fastdpo.FastDPOLoss(**{option: value})


@pytest.mark.parametrize("value", [float("nan"), -0.1, 1.0, float("inf"), True])
def test_grad_tolerance_must_be_a_fraction(value):
    with pytest.raises(ValueError, match="grad_tolerance must be in"):
        fastdpo.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), grad_tolerance=value)
    with pytest.raises(ValueError, match="grad_tolerance must be in"):
        fastdpo.FastDPOLoss(grad_tolerance=value)


# --- reference arguments that would be ignored ----------------------------------------------------------------


def test_precomputed_reference_and_ref_hidden_states_together_are_refused():
    with pytest.raises(ValueError, match="either ref_chosen_logps/ref_rejected_logps .* or ref_hidden_states"):
        dpo(ref_hidden_states=torch.randn(4, 6, 16))


def test_ref_lm_head_bias_without_ref_lm_head_weight_is_refused():
    with pytest.raises(ValueError, match="ref_lm_head_bias needs ref_lm_head_weight"):
        dpo(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden_states=torch.randn(4, 6, 16),
            ref_lm_head_bias=torch.zeros(50))


@pytest.mark.parametrize("name,value", [("ref_lm_head_weight", torch.randn(50, 16)),
                                        ("ref_lm_head_bias", torch.zeros(50))])
def test_reference_head_without_ref_hidden_states_is_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} is only used with ref_hidden_states"):
        dpo(**{name: value})


def test_reference_head_with_its_bias_is_used():
    hs, w, labels, _ = batch()
    ref_w, ref_b = torch.randn(50, 16), torch.randn(50)
    loss_fn = fastdpo.FastDPOLoss(backend="torch")
    out = loss_fn(hs, w, labels, ref_hidden_states=hs, ref_lm_head_weight=ref_w, ref_lm_head_bias=ref_b)
    without_bias = loss_fn(hs, w, labels, ref_hidden_states=hs, ref_lm_head_weight=ref_w)
    assert not torch.equal(out.chosen_rewards, without_bias.chosen_rewards)


# --- narrow label dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_label_dtypes_are_widened(backend, dtype):
    if backend == "triton":
        pytest.importorskip("fastdpo.kernels.logprob_forward")
    vocab = 200
    hidden, weight = torch.randn(2, 7, 16), torch.randn(vocab, 16)
    targets = torch.randint(0, 100, (2, 7))
    targets[0, 1] = 156 if dtype == torch.uint8 else -100  # 156 is -100 wrapped to uint8: a real token there
    targets[1, 2] = 99
    expected = fastdpo.linear_logprobs(hidden, weight, targets, backend=backend)
    got = fastdpo.linear_logprobs(hidden, weight, targets.to(dtype), backend=backend)
    assert torch.equal(got, expected)
    if dtype == torch.uint8:
        assert got[0, 1] != 0  # scored, not mistaken for ignore_index
    labels = targets.to(dtype)
    refs = dict(ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))
    out = fastdpo.FastDPOLoss(backend=backend)(hidden, weight, labels, **refs)
    want = fastdpo.FastDPOLoss(backend=backend)(hidden, weight, targets, **refs)
    assert torch.equal(out.loss, want.loss)


# --- double backward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_refused_clearly(backend):
    if backend == "triton":
        pytest.importorskip("fastdpo.kernels.logprob_forward")
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    logps = fastdpo.linear_logprobs(hidden, weight, torch.randint(0, 30, (5,)), backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(logps.sum(), hidden, create_graph=True)
    # A first-order gradient still works
    logps = fastdpo.linear_logprobs(hidden, weight, torch.randint(0, 30, (5,)), backend=backend)
    (grad,) = torch.autograd.grad(logps.sum(), hidden)
    assert torch.isfinite(grad).all()


# --- Triton's interpreter and bfloat16 --------------------------------------------------------------------------


def test_triton_bfloat16_under_the_interpreter_is_refused(monkeypatch):
    pytest.importorskip("fastdpo.kernels.logprob_forward")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden, weight = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 .* TRITON_INTERPRET=1"):
        fastdpo.linear_logprobs(hidden, weight, torch.tensor([0, 1, 2]), backend="triton")
    with pytest.raises(ValueError, match="bfloat16 .* TRITON_INTERPRET=1"):  # bf16 autocast counts too
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fastdpo.linear_logprobs(hidden.float(), weight.float(), torch.tensor([0, 1, 2]), backend="triton")
    hs, w, labels, refs = batch()
    with pytest.raises(ValueError, match="bfloat16 .* TRITON_INTERPRET=1"):
        fastdpo.FastDPOLoss(backend="triton")(hs.bfloat16(), w.bfloat16(), labels, **refs)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_fused_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="fused must be True or False"):
        fastdpo.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), fused=bad)
    with pytest.raises(ValueError, match="fused must be True or False"):
        fastdpo.FastDPOLoss(fused=bad)
