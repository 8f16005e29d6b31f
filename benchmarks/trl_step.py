"""One TRL DPOTrainer step on a tiny random Llama, stock TRL vs `fastdpo.patch_trl()`, CPU timing.

    python benchmarks/trl_step.py                      # defaults: vocab 32768, hidden 64, 8 pairs
    python benchmarks/trl_step.py --vocab 65536 --hidden 128 --pairs 4 --steps 5

Both runs start from the same weights and see the same batches; the script prints the median wall time of a
training step (forward of policy and reference, loss, backward, optimizer) for each, the speed-up, and the
largest relative difference of the logged loss. No downloads (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from tiny_models import cpu_dpo_config, offline_env, perturbed_copy, tiny_llama, tiny_preference_dataset, tiny_tokenizer  # noqa: E402

offline_env()

import torch  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402

import fastdpo  # noqa: E402
from fastdpo.trl_patch import patch_trl  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def run(args, patched: bool):
    from trl import DPOTrainer

    policy = tiny_llama(0, vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers)
    ref = perturbed_copy(policy, scale=0.05, seed=1)
    dataset = tiny_preference_dataset(args.pairs * (args.steps + 1), seed=0, prompt_len=(8, 24),
                                      completion_len=(16, args.max_completion))
    config = cpu_dpo_config(
        "fastdpo_bench_", per_device_train_batch_size=args.pairs, max_steps=args.steps + 1,  # step 1 is warm-up
        learning_rate=1e-3, logging_steps=1, disable_tqdm=True,
    )
    timer = StepTimer()
    with patch_trl() if patched else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=dataset,
                             processing_class=tiny_tokenizer(), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # keep the output to the summary
        trainer.train()
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return timer.times[1:], losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--max-completion", type=int, default=48, help="longest completion, in words")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import trl

    print(f"trl {trl.__version__}, fastdpo {getattr(fastdpo, '__version__', '?')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; {args.pairs} pairs/step, "
          f"{args.steps} timed steps")
    stock_times, stock_losses = run(args, patched=False)
    fast_times, fast_losses = run(args, patched=True)
    stock, fast = statistics.median(stock_times), statistics.median(fast_times)
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock_losses, fast_losses))
    print(f"stock TRL head       : {stock * 1e3:9.1f} ms/step  (steps: {', '.join(f'{t:.3f}' for t in stock_times)} s)")
    print(f"fastdpo.patch_trl()  : {fast * 1e3:9.1f} ms/step  (steps: {', '.join(f'{t:.3f}' for t in fast_times)} s)")
    print(f"speed-up             : {stock / fast:9.2f}x")
    print(f"max rel. loss diff   : {diff:9.2e}")


if __name__ == "__main__":
    main()
