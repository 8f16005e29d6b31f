"""Benchmark cases and an input generator that looks like a trained LM head.

Uniform random logits are the wrong workload for DPO heads: every vocabulary tile then carries gradient, so
kernels that skip negligible softmax entries (CCE's filter, fastdpo's) look worse than they are on real models,
and log-probabilities sit near -log V instead of a few nats. The generator below builds a clustered LM head and
hidden states aimed at each position's next token (plus a competing token and noise), then scales the hidden
states so that the mean next-token entropy hits a target (a few nats, like a trained model).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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

    @property
    def tokens(self) -> int:
        return self.n_seqs * self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens}


# --- case sets --------------------------------------------------------------------------------------------------

# 2-core CPU, under 5 minutes for every implementation (issue 5)
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


def case_set(device: str, quick: bool) -> tuple[Case, ...]:
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
