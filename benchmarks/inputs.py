"""Benchmark cases and an input generator that looks like a trained LM head.

Uniform random logits are the wrong workload for DPO heads: every vocabulary tile then carries gradient, so
kernels that skip negligible softmax entries (CCE's filter, fastdpo's) look worse than they are on real models,
and log-probabilities sit near -log V instead of a few nats. The generator below builds a clustered LM head and
hidden states aimed at each position's next token (plus a competing token and noise), then scales the hidden
states so that the mean next-token entropy hits a target (a few nats, like a trained model).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

IGNORE_INDEX = -100
BETA = 0.1
TARGET_ENTROPY = 2.5  # nats; trained LMs sit around 1-4 on ordinary text


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # plots draw one panel per group, x = tokens
    n_seqs: int  # 2B: chosen rows first, then rejected
    seq_len: int
    hidden: int
    vocab: int
    dtype: str  # "float32" | "bfloat16"
    softcap: float | None = None
    inputs: str = "clustered"  # the generator: "clustered" (make_inputs) or "lm" (make_lm_inputs, LMShape())
    frozen_head: bool = False  # the LM head does not require grad (LoRA-style training): no dW

    @property
    def tokens(self) -> int:
        return self.n_seqs * self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens}


# --- case sets --------------------------------------------------------------------------------------------------

# 2-core CPU, under 5 minutes for every implementation
QUICK_CPU = (
    Case("cpu-2k-h256-v32k", "cpu-h256-v32k", 8, 256, 256, 32768, "float32"),
    Case("cpu-2k-h256-v64k", "cpu-h256-v64k", 8, 256, 256, 65536, "float32"),
)

# Without --quick on CPU: more tokens and a larger head, still minutes rather than hours
FULL_CPU = QUICK_CPU + (
    Case("cpu-4k-h256-v64k", "cpu-h256-v64k", 16, 256, 256, 65536, "float32"),
    Case("cpu-8k-h256-v64k", "cpu-h256-v64k", 16, 512, 256, 65536, "float32"),
    Case("cpu-2k-h512-v128k", "cpu-h512-v128k", 8, 256, 512, 131072, "float32"),
)

# Real LM heads (hidden, vocab, final-logit softcap)
GPU_MODELS = {
    "llama3.2-1b": (2048, 128256, None),
    "llama3-8b": (4096, 128256, None),
    "qwen2.5-7b": (3584, 152064, None),
    "gemma2-2b": (2304, 256000, 30.0),
}
GPU_TOKENS = (4096, 16384, 65536)
GPU_SEQ_LEN = 1024
LONG_PAIR = ("llama3-8b", 16384)  # one chosen/rejected pair of 16k tokens each: 32k tokens


def gpu_cases() -> tuple[Case, ...]:
    cases = []
    for model, (hidden, vocab, softcap) in GPU_MODELS.items():
        for tokens in GPU_TOKENS:
            cases.append(
                Case(f"{model}-{tokens // 1024}k", model, tokens // GPU_SEQ_LEN, GPU_SEQ_LEN, hidden, vocab,
                     "bfloat16", softcap)
            )
    model, seq_len = LONG_PAIR
    hidden, vocab, softcap = GPU_MODELS[model]
    cases.append(Case(f"{model}-pair-{2 * seq_len // 1024}k", f"{model}-long-pair", 2, seq_len, hidden, vocab,
                      "bfloat16", softcap))
    return tuple(cases)


# --sparse: the model of a trained LM's softmax (make_lm_inputs), where a gradient tolerance can skip work.
# 8 x 257 tokens: one more than the quick shape, so that the scored count is not a multiple of a token block.
SPARSE_CPU = (Case("cpu-2k-h256-v64k-lm", "cpu-lm-h256-v64k", 8, 257, 256, 65536, "float32", inputs="lm"),)


# --tiny: seconds on a CPU, for checking the whole harness end to end (gpu_check.py --dry-run); not a measurement.
TINY_CPU = (Case("tiny-h32-v500", "tiny-h32-v500", 4, 48, 32, 500, "float32"),)


def frozen(cases: tuple[Case, ...]) -> tuple[Case, ...]:
    """The same cases with the head frozen (weight.requires_grad False), named `<case>-frozen`."""
    return tuple(replace(c, name=f"{c.name}-frozen", group=f"{c.group}-frozen", frozen_head=True) for c in cases)


def case_set(device: str, quick: bool, sparse: bool = False, frozen_head: bool = False,
             tiny: bool = False) -> tuple[Case, ...]:
    """The cases of one run.py set; frozen_head=True gives their frozen-head twins."""
    cases = TINY_CPU if tiny else _trainable_set(device, quick, sparse)
    return frozen(cases) if frozen_head else cases


def _trainable_set(device: str, quick: bool, sparse: bool) -> tuple[Case, ...]:
    if sparse:
        if device == "cuda":
            return tuple(Case(c.name.replace("cpu", "gpu"), c.group.replace("cpu", "gpu"), c.n_seqs, c.seq_len,
                              c.hidden, c.vocab, "bfloat16", inputs=c.inputs) for c in SPARSE_CPU)
        return SPARSE_CPU
    if device == "cuda":
        # --quick on a GPU still means "small": the CPU shapes, in bf16 like the real ones
        if quick:
            return tuple(
                Case(c.name.replace("cpu", "gpu"), c.group.replace("cpu", "gpu"), c.n_seqs, c.seq_len, c.hidden,
                     c.vocab, "bfloat16") for c in QUICK_CPU
            )
        return gpu_cases()
    return QUICK_CPU if quick else FULL_CPU


def all_cases() -> dict[str, Case]:
    """Every case by name (workers get only the name on their command line)."""
    cases = {}
    for device in ("cpu", "cuda"):
        for quick in (True, False):
            cases.update({c.name: c for c in case_set(device, quick)})
        cases.update({c.name: c for c in case_set(device, True, sparse=True)})
    cases.update({c.name: c for c in TINY_CPU})
    cases.update({c.name: c for c in frozen(tuple(cases.values()))})
    return cases


# --- the generator ----------------------------------------------------------------------------------------------


def transform(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _zipf_ids(n: int, vocab: int, perm: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Log-uniform ranks (Zipf with exponent ~1): a few frequent tokens, a long tail, like real text
    u = torch.rand(n, generator=gen, device=perm.device)
    ranks = (torch.exp(u * math.log(vocab)) - 1).long().clamp_(0, vocab - 1)
    return perm[ranks]


def _make_head(vocab: int, hidden: int, gen: torch.Generator, device) -> torch.Tensor:
    # Tokens come in clusters (shared direction) so near-synonyms compete for probability mass, as in real heads
    n_clusters = 64
    centers = torch.randn(n_clusters, hidden, generator=gen, device=device)
    assign = torch.randint(0, n_clusters, (vocab,), generator=gen, device=device)
    w = 0.6 * centers[assign] + 0.8 * torch.randn(vocab, hidden, generator=gen, device=device)
    w = w / w.norm(dim=1, keepdim=True)
    return w * torch.exp(0.2 * torch.randn(vocab, 1, generator=gen, device=device))  # uneven row norms


def _directions(weight: torch.Tensor, next_ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Unit-scale hidden directions: the next token's row, a competitor's row (sometimes stronger), noise."""
    n, hidden = next_ids.numel(), weight.shape[1]
    device = weight.device
    unit = weight / weight.norm(dim=1, keepdim=True)
    competitor = torch.randint(0, weight.shape[0], (n,), generator=gen, device=device)
    # eta > 1 puts the competitor on top: the target is then likely but not the argmax
    eta = 1.15 * torch.rand(n, 1, generator=gen, device=device)
    noise = torch.randn(n, hidden, generator=gen, device=device) / math.sqrt(hidden)
    d = unit[next_ids.flatten()] + eta * unit[competitor] + 0.5 * noise
    # Per-token confidence: some positions are near-deterministic, others genuinely uncertain
    return d * torch.exp(0.5 * torch.randn(n, 1, generator=gen, device=device))


def calibrate_scale(base_logits: torch.Tensor, softcap: float | None, target: float, grid: int = 12,
                    iters: int = 10) -> float:
    """Scale s with mean entropy of softmax(transform(s * base_logits)) == target.

    Without softcap the entropy of softmax(s*z) only falls as s grows; with softcap it rises again once the logits
    saturate at +-softcap. So: scan a log grid, keep the falling branch up to the minimum, bisect the crossing.
    """
    def entropy(log_s: float) -> float:
        return token_entropy(transform(base_logits * math.exp(log_s), softcap)).mean().item()

    log_grid = torch.linspace(math.log(1e-2), math.log(1e4), grid).tolist()
    ent = [entropy(x) for x in log_grid]
    lowest = min(range(grid), key=ent.__getitem__)
    crossing = next((i for i in range(lowest + 1) if ent[i] <= target), None)
    if crossing is None:  # the target is out of reach (e.g. a tiny vocabulary with softcap): take the closest
        return math.exp(log_grid[lowest])
    if crossing == 0:
        return math.exp(log_grid[0])
    lo, hi = log_grid[crossing - 1], log_grid[crossing]
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if entropy(mid) > target else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def _labels(next_ids: torch.Tensor, n_seqs: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """HF-convention labels: labels[:, t] = token t (hidden[:, t-1] predicts it); prompts and padding -100.

    A chosen row and its rejected row share the prompt, so they share its length; about half the rows end in
    padding.
    """
    device = next_ids.device
    labels = torch.full((n_seqs, seq_len), IGNORE_INDEX, dtype=torch.long, device=device)
    labels[:, 1:] = next_ids[:, :-1]
    n_pairs = n_seqs // 2
    prompt = (seq_len * (0.2 + 0.3 * torch.rand(n_pairs, generator=gen, device=device))).long().repeat(2)
    pad = (seq_len * 0.15 * torch.rand(n_seqs, generator=gen, device=device)).long()
    pad = pad * (torch.rand(n_seqs, generator=gen, device=device) < 0.5)
    pos = torch.arange(seq_len, device=device)
    masked = (pos[None, :] < prompt[:, None]) | (pos[None, :] >= seq_len - pad[:, None])
    return labels.masked_fill(masked, IGNORE_INDEX)


def make_inputs(case: Case, device: str = "cpu", seed: int = 0, target_entropy: float = TARGET_ENTROPY,
                calib_tokens: int = 256) -> dict:
    """hidden [2B, T, H], weight [V, H] (case dtype), labels [2B, T] and zero reference log-probs [B] x2.

    Liger's DPO loss cannot take precomputed reference log-probs, so every implementation gets zeros.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = _make_head(case.vocab, case.hidden, gen, device)
    perm = torch.randperm(case.vocab, generator=gen, device=device)
    next_ids = _zipf_ids(case.tokens, case.vocab, perm, gen).view(case.n_seqs, case.seq_len)
    d = _directions(weight, next_ids, gen)

    sample = torch.randperm(case.tokens, generator=gen, device=device)[:calib_tokens]
    scale = calibrate_scale(d[sample] @ weight.T, case.softcap, target_entropy)
    dtype = case.torch_dtype
    n_pairs = case.n_seqs // 2
    zeros = torch.zeros(n_pairs, dtype=torch.float32, device=device)
    return {
        "hidden": (d * scale).view(case.n_seqs, case.seq_len, case.hidden).to(dtype).contiguous(),
        "weight": weight.to(dtype).contiguous(),
        "labels": _labels(next_ids, case.n_seqs, case.seq_len, gen),
        "ref_chosen_logps": zeros,
        "ref_rejected_logps": zeros.clone(),
        "scale": scale,
    }


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1], last position ignored: the same shape as the hidden states.

    Peers that do not shift get these, so that they score hidden[:, t] against the next token without slicing
    (and copying) the hidden states. The twin of fastdpo.sequences.shifted_targets on purpose: the harness and its
    float64 reference share no code with the library they check.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


@torch.no_grad()
def input_stats(inputs: dict, softcap: float | None, max_tokens: int = 4096, chunk: int = 512) -> dict:
    """Achieved mean entropy, top-1 rate and mean log-prob of the target over (a sample of) the scored tokens."""
    targets = shifted_targets(inputs["labels"]).flatten()
    h = inputs["hidden"].flatten(0, 1)
    valid = (targets != IGNORE_INDEX).nonzero().flatten()
    if valid.numel() > max_tokens:
        valid = valid[torch.linspace(0, valid.numel() - 1, max_tokens, device=valid.device).long()]
    w = inputs["weight"].float()
    ent, top1, logp = [], [], []
    for idx in valid.split(chunk):
        z = transform(h[idx].float() @ w.T, softcap)
        lp = torch.log_softmax(z, dim=-1)
        ent.append(-(lp.exp() * lp).sum(-1))
        top1.append(z.argmax(-1) == targets[idx])
        logp.append(lp.gather(1, targets[idx, None]).squeeze(1))
    ent, top1, logp = torch.cat(ent), torch.cat(top1), torch.cat(logp)
    return {
        "mean_entropy": ent.mean().item(),
        "target_top1": top1.float().mean().item(),
        "mean_target_logp": logp.mean().item(),
        "valid_tokens": int((targets != IGNORE_INDEX).sum().item()),
    }


# --- a model of a trained LM's next-token distribution over a BPE vocabulary ----------------------------------


@dataclass(frozen=True)
class LMShape:
    """Parameters of make_lm_inputs (a model of a trained LM's softmax, not a trained LM; see there).

    zipf: exponent s of the frequency base, logit -s log(1 + id) (ids run by frequency, as BPE merges do).
    context_entries: K, how many entries each position's context lifts (a topic's members).
    context_strength: b, the lift in nats (a member's logit is b above the base).
    target_entropy: mean next-token entropy in nats; the next token's own lift is calibrated to reach it.
    """

    zipf: float = 1.5
    context_entries: int = 256
    context_strength: float = 8.0
    target_entropy: float = 2.0


LM_TOPICS = 64  # contexts the positions draw from; each lifts its own K entries


def lm_logit_parts(case: Case, shape: LMShape, gen: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    """(weight [V, H], topic directions [topics, H - 1], per-token directions [V, H - 1], members [topics, K]).

    The head is built so that hidden @ weight.T is exactly the model's logits (the fused heads under test only
    ever see hidden states and a head): column 0 carries the frequency base, the other H - 1 columns hold one
    random unit direction per topic (added to the rows of its members) and one per token (its own lift).
    """
    vocab, hidden = case.vocab, case.hidden
    ids = torch.arange(vocab, device=device, dtype=torch.float32)
    # "Roughly" by frequency: BPE ids follow merge order, which follows frequency with scatter
    log_rank = torch.log1p(ids) + 0.3 * torch.randn(vocab, generator=gen, device=device)
    topics = torch.randn(LM_TOPICS, hidden - 1, generator=gen, device=device)
    topics = topics / topics.norm(dim=1, keepdim=True)
    # Context entries are frequency-weighted too (frequent tokens fit more contexts), spread over the ids
    # (distinct within a topic: weights 1 / (1 + id), drawn without replacement)
    members = torch.multinomial((1.0 / (1.0 + ids)).expand(LM_TOPICS, vocab), shape.context_entries,
                                replacement=False, generator=gen)
    own = torch.randn(vocab, hidden - 1, generator=gen, device=device) / math.sqrt(hidden - 1)
    body = own.clone()
    body.index_add_(0, members.flatten(), topics.repeat_interleave(shape.context_entries, 0))
    weight = torch.cat([-log_rank[:, None], body], dim=1)
    return weight, topics, own, members


def make_lm_inputs(case: Case, shape: LMShape = LMShape(), device: str = "cpu", seed: int = 0,
                   calib_tokens: int = 256) -> dict:
    """Inputs whose softmax looks like a trained LM's over a BPE vocabulary: a model of one, not one.

    Each position's logits are, exactly (hidden @ weight.T, fp32 before the cast to the case dtype):

        z_v = -s log(1 + v)                 Zipf-like base, falling with the id (ids run by frequency,
              + 0.3 s noise_v                 with a fixed per-id scatter: "roughly" by frequency)
              + b [v in context(t)]         K context entries of the position's topic, lifted by b nats
              + a [v = next token]          the next token's own lift, a calibrated so that the mean
              + small cross-talk            entropy is target_entropy (the random directions are not
                                            exactly orthogonal: about b/sqrt(H) and a/sqrt(H) of noise)

    Parameters (LMShape): s = zipf (default 1.5), K = context_entries (256: "a few hundred"), b =
    context_strength (8 nats), target_entropy (2.0 nats; 1-3 is the range of trained LMs on ordinary text).
    Each position draws its topic uniformly from 64; a topic's K members are drawn without replacement with
    weights 1 / (1 + id) (frequent tokens fit more contexts); the next token is one of the position's members,
    with the same weights. When the base and context alone already give less than target_entropy, no lift is
    added (a = 0) and the achieved entropy (input_stats) stays below the target.

    What it does not capture: real conditional distributions are not a fixed base plus one topic; how much
    mass a real model leaves in the far tail (and where, by id) decides the kept fraction of a sparse backward,
    and this model's tail follows the base exponent s exactly. The sweep (tools/sparsity_sweep.py) shows
    how the kept fraction moves with s, K, b and the entropy; measure on a real model's hidden states before
    relying on a number from here.
    """
    if case.hidden < 2:
        raise ValueError(f"case.hidden must be at least 2 for make_lm_inputs, got {case.hidden}")
    gen = torch.Generator(device=device).manual_seed(seed)
    weight, topics, own, members = lm_logit_parts(case, shape, gen, device)
    topic = torch.randint(0, LM_TOPICS, (case.tokens,), generator=gen, device=device)
    # The next token is one of its context's entries, the frequent ones more often (weights 1 / (1 + id))
    pick = torch.multinomial(1.0 / (1.0 + members[topic].float()), 1, generator=gen).squeeze(1)
    next_ids = members[topic].gather(1, pick[:, None]).view(case.n_seqs, case.seq_len)
    own_unit = own / own.norm(dim=1, keepdim=True)
    fixed = torch.cat([torch.full((case.tokens, 1), shape.zipf, device=device),
                       shape.context_strength * topics[topic]], dim=1)
    lift = torch.cat([torch.zeros(case.tokens, 1, device=device),
                      own_unit[next_ids.flatten()] / own[next_ids.flatten()].norm(dim=1, keepdim=True)], dim=1)
    sample = torch.randperm(case.tokens, generator=gen, device=device)[:calib_tokens]
    a = calibrate_lift(fixed[sample] @ weight.T, lift[sample] @ weight.T, shape.target_entropy)
    hidden = (fixed + a * lift).view(case.n_seqs, case.seq_len, case.hidden)
    n_pairs = case.n_seqs // 2
    zeros = torch.zeros(n_pairs, dtype=torch.float32, device=device)
    return {
        "hidden": hidden.to(case.torch_dtype).contiguous(),
        "weight": weight.to(case.torch_dtype).contiguous(),
        "labels": _labels(next_ids, case.n_seqs, case.seq_len, gen),
        "ref_chosen_logps": zeros,
        "ref_rejected_logps": zeros.clone(),
        "scale": a,
    }


def calibrate_lift(fixed_logits: torch.Tensor, lift_logits: torch.Tensor, target: float, iters: int = 16) -> float:
    """a >= 0 with mean entropy of softmax(fixed + a * lift) == target (bisection; entropy falls with a).

    Without the lift the entropy is the base's; a target above it cannot be reached: a = 0 then.
    """
    def entropy(a: float) -> float:
        return token_entropy(fixed_logits + a * lift_logits).mean().item()

    lo, hi = 0.0, 1.0
    if entropy(lo) <= target:
        return 0.0
    while entropy(hi) > target and hi < 1e4:
        lo, hi = hi, 2 * hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if entropy(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def build_inputs(case: Case, device: str = "cpu", seed: int = 0) -> dict:
    """The case's inputs from the generator it names (case.inputs)."""
    if case.inputs == "lm":
        return make_lm_inputs(case, device=device, seed=seed)
    if case.inputs == "clustered":
        return make_inputs(case, device, seed)
    raise ValueError(f"case.inputs must be 'clustered' or 'lm', got {case.inputs!r}")
