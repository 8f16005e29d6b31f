"""Whole TRL DPOTrainer steps, stock TRL vs `fastdpo.patch_trl()`: step time and peak memory.

    python benchmarks/trl_step.py                      # CPU: a tiny random Llama (vocab 32768, hidden 64), 8 pairs
    python benchmarks/trl_step.py --vocab 65536 --hidden 128 --pairs 4 --steps 5
    python benchmarks/trl_step.py --device cuda --models llama3.2-1b,qwen2.5-0.5b --heads trainable,lora \
        --pairs 8 --seq-len 1024 --json step.json    # the GPU set: real model shapes in bf16
    python benchmarks/trl_step.py --tiny --json step.json   # both configurations at tiny sizes: seconds on a CPU

Models: `cpu-tiny` (the default: tests/tiny_models.tiny_llama, sized by --vocab/--hidden/--layers, fp32) or the
configurations in MODEL_CONFIGS (Llama-3.2-1B, Qwen2.5-0.5B: the published shapes, randomly initialised from the
config dict written here, bf16 on a GPU; nothing is downloaded, HF_HUB_OFFLINE=1). Heads: `trainable` (full
fine-tuning, the LM head trains; a reference model beside the policy) or `lora` (peft LoRA on the attention and
MLP projections, the head frozen, the reference is the policy with its adapters off).

For every (model, head) both runs start from the same weights and see the same batches; a row per run gives the
median wall time of a training step after --warmup steps (forward of policy and reference, loss, backward,
optimizer), every step's time, on a GPU the peak allocated memory during the timed steps (weights, optimizer and
activations included), and the logged losses. --json rewrites its file after every row, so a stopped run keeps
what finished. Missing trl/transformers (or peft, for `lora`) give `skipped: <why>` rows, not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from tiny_models import offline_env  # noqa: E402

offline_env()
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

# Published shapes (config.json of meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-0.5B), written here so that nothing is
# downloaded. Llama's rope scaling stays at the default: it changes no shape and no step time at 1,024 tokens.
MODEL_CONFIGS = {
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True),
}
# --tiny: the same model types at toy sizes (a CPU check of the script)
TINY_CONFIGS = {
    name: dict(cfg, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    for name, cfg in MODEL_CONFIGS.items()
}
CPU_TINY = "cpu-tiny"
HEADS = ("trainable", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)  # tests/tiny_models.tiny_tokenizer's


class StepTimer:
    """A transformers TrainerCallback (built in make_timer, so that this module imports without transformers):
    each step's wall time, synchronised on a GPU; the peak allocated memory from the first timed step on."""

    def __init__(self, warmup: int, cuda: bool):
        self.times, self.warmup, self.cuda, self._t0, self.peak_bytes = [], warmup, cuda, None, None

    def begin(self):
        if self.cuda:
            torch.cuda.synchronize()
            if len(self.times) == self.warmup:
                torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()

    def end(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        self.times.append(time.perf_counter() - self._t0)


def make_timer(warmup: int, cuda: bool):
    from transformers import TrainerCallback

    timer = StepTimer(warmup, cuda)

    class Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.begin()

        def on_step_end(self, args, state, control, **kwargs):
            timer.end()

    return timer, Callback()


def build_model(args, model: str):
    """(policy, reference): the reference starts as the policy's weights (a perturbed copy for the CPU model)."""
    if model == CPU_TINY:
        from tiny_models import perturbed_copy, tiny_llama

        policy = tiny_llama(0, vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers)
        return policy, perturbed_copy(policy, scale=0.05, seed=1)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict((TINY_CONFIGS if args.tiny else MODEL_CONFIGS)[model])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, **SPECIAL_IDS,
                                  attn_implementation="sdpa" if args.device == "cuda" else "eager")
    torch.manual_seed(0)
    with torch.device(args.device):
        policy = AutoModelForCausalLM.from_config(config).to(dtype_of(args))
    return policy, copy.deepcopy(policy)


def dtype_of(args) -> torch.dtype:
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def dataset(args, model: str):
    from tiny_models import tiny_preference_dataset

    n = args.pairs * (args.warmup + args.steps)
    if model == CPU_TINY:
        return tiny_preference_dataset(n, seed=0, prompt_len=(8, 24), completion_len=(16, args.max_completion))
    # prompt + completion near seq_len tokens (one word, one token); DPOConfig.max_length cuts at seq_len
    prompt = max(1, args.seq_len // 4)
    completion = args.seq_len - prompt - 2
    return tiny_preference_dataset(n, seed=0, prompt_len=(prompt, prompt),
                                   completion_len=(completion * 7 // 8, completion))


def missing_packages(head: str) -> str | None:
    """Why a row cannot run here ('trl not importable (...)'), or None."""
    import importlib

    for module in ("transformers", "trl") + (("peft",) if head == "lora" else ()):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} not importable ({exc})"
    return None


def run(args, model: str, head: str, patched: bool) -> dict:
    """One trainer run; the row's timings, peak memory and losses."""
    from transformers import PrinterCallback
    from trl import DPOTrainer

    from fastdpo.trl_patch import patch_trl
    from tiny_models import cpu_dpo_config, tiny_tokenizer

    policy, ref = build_model(args, model)
    timer, callback = make_timer(args.warmup, args.device == "cuda")
    config = cpu_dpo_config(
        "fastdpo_bench_", per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps,
        learning_rate=1e-5 if head == "trainable" else 1e-4, logging_steps=1, disable_tqdm=True,
        use_cpu=args.device == "cpu", bf16=args.device == "cuda", max_length=args.seq_len,
    )
    peft_config = None
    if head == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                 task_type="CAUSAL_LM")
        ref = None  # the policy with its adapters off
    with patch_trl() if patched else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=dataset(args, model),
                             processing_class=tiny_tokenizer(), callbacks=[callback], peft_config=peft_config)
        trainer.remove_callback(PrinterCallback)  # keep the output to the summary
        trainer.train()
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    times = timer.times[args.warmup:]
    return dict(ms=statistics.median(times) * 1e3, step_ms=[t * 1e3 for t in times],
                warmup_ms=[t * 1e3 for t in timer.times[:args.warmup]], peak_bytes=timer.peak_bytes, losses=losses)


def measure(args, model: str, head: str, patched: bool) -> dict:
    """A row whatever happens: `ok`, `skipped: <why>` or `error: <what>`."""
    row = dict(model=model, head=head, trl="patched" if patched else "stock", device=args.device,
               dtype=str(dtype_of(args)).removeprefix("torch."), pairs=args.pairs,
               seq_len=args.seq_len if model != CPU_TINY else None, status="ok")
    why = missing_packages(head)
    if why:
        return dict(row, status=f"skipped: {why}")
    try:
        row.update(run(args, model, head, patched))
    except Exception as exc:  # noqa: BLE001 - one failing run must not lose the others
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        row["status"] = "error: " + ("out of memory" if "out of memory" in text.lower() else text[:300])
    finally:
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row


def pair_lines(rows: list[dict]) -> list[str]:
    """Per (model, head): stock and patched ms/step and peak, the speed-up, the largest relative loss difference."""
    lines = []
    for key in dict.fromkeys((r["model"], r["head"]) for r in rows):
        pair = {r["trl"]: r for r in rows if (r["model"], r["head"]) == key}
        lines.append(f"{key[0]}, {key[1]} head:")
        for name in ("stock", "patched"):
            r = pair.get(name)
            if r is None:
                continue
            if r["status"] != "ok":
                lines.append(f"  {name:<8} {r['status']}")
                continue
            peak = "" if r.get("peak_bytes") is None else f", peak {r['peak_bytes'] / 2**30:.2f} GiB"
            lines.append(f"  {name:<8} {r['ms']:9.1f} ms/step{peak}  (steps: "
                         f"{', '.join(f'{t:.1f}' for t in r['step_ms'])} ms)")
        stock, fast = pair.get("stock", {}), pair.get("patched", {})
        if stock.get("status") == fast.get("status") == "ok":
            diff = max((abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock["losses"], fast["losses"])), default=0)
            lines.append(f"  speed-up {stock['ms'] / fast['ms']:.2f}x, max rel. loss diff {diff:.2e}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help=f"comma-separated, of {CPU_TINY},{','.join(MODEL_CONFIGS)} (default {CPU_TINY}; "
                             f"with --tiny every configuration)")
    parser.add_argument("--heads", default="trainable", help=f"comma-separated, of {','.join(HEADS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="the configurations at toy sizes, both heads, 2 pairs of 64 tokens, 1 + 1 steps")
    parser.add_argument("--vocab", type=int, default=32768, help=f"{CPU_TINY} only")
    parser.add_argument("--hidden", type=int, default=64, help=f"{CPU_TINY} only")
    parser.add_argument("--layers", type=int, default=2, help=f"{CPU_TINY} only")
    parser.add_argument("--max-completion", type=int, default=48, help=f"{CPU_TINY}: longest completion, in words")
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after the warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (rewritten after each)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models = args.models or ",".join(MODEL_CONFIGS)
        args.heads, args.pairs, args.seq_len, args.warmup, args.steps = ",".join(HEADS), 2, 64, 1, 1
    args.models = [m.strip() for m in (args.models or CPU_TINY).split(",") if m.strip()]
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = sorted(set(args.models) - {CPU_TINY, *MODEL_CONFIGS}) + sorted(set(args.heads) - set(HEADS))
    if unknown:
        parser.error(f"unknown model(s) or head(s) {unknown}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import fastdpo

    print(f"fastdpo {getattr(fastdpo, '__version__', '?')}, torch {torch.__version__}, {args.device}; "
          f"models {', '.join(args.models)}; heads {', '.join(args.heads)}; {args.pairs} pairs/step, "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
    rows = []
    for model in args.models:
        for head in args.heads:
            for patched in (False, True):
                rows.append(measure(args, model, head, patched))
                print(f"[trl_step] {model} {head} {rows[-1]['trl']}: {rows[-1]['status']}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(dict(device=device_name(args.device), rows=rows), indent=2) + "\n")
    print("\n".join(pair_lines(rows)))
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main())
