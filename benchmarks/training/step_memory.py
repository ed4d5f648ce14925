"""Peak memory and time of one `tessera train` step, with and without its memory options.

    python benchmarks/training/step_memory.py --out /tmp/step_memory.json     # CPU (about a minute): peak RSS
    python benchmarks/training/step_memory.py --device cuda --hidden 2048 --layers 16 --tokens 512 \
        --out results/step_memory.json                                         # GPU: peak allocated

A random Llama (`--hidden`, `--layers`; a real checkpoint written to a temporary directory and loaded by the
trainer as any model is) trains 8 rank-8 modules with every regulariser on, batches of `--batch` conversations
of about `--tokens` tokens each. Every option runs in a process of its own, so each peak is that option's alone:

    plain       one pass of the whole batch (TrainConfig's defaults)
    micro=N     micro_batch_size N: passes of N rows whose gradients add up
    ckpt        gradient_checkpointing: each decoder layer recomputed in the backward pass
    micro+ckpt  both

Peak memory is the process's peak resident set on the CPU (ru_maxrss; it includes the interpreter and the
model) and torch.cuda.max_memory_allocated on CUDA, measured over `--steps` steps after one warm-up step;
time is the median step. The table also gives each option's peak over plain's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

OPTIONS = {"plain": {}, "micro=2": {"micro_batch_size": 2}, "ckpt": {"gradient_checkpointing": True},
           "micro=2+ckpt": {"micro_batch_size": 2, "gradient_checkpointing": True}}


def _examples(count: int, tokens: int, seed: int):
    from training.data import Example

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta"]
    examples = []
    for index in range(count):
        text = " ".join(rng.choice(words) for _ in range(tokens // 4))
        examples.append(Example(f"t{index % 2}", [{"role": "user", "content": text},
                                                 {"role": "assistant", "content": text[::-1]}]))
    return examples


def _measure(model_dir: str, option: str, args: argparse.Namespace, queue) -> None:
    import torch

    from training.config import TrainConfig
    from training.step import StepRunner
    from training.trainer import Trainer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = TrainConfig(num_modules=8, rank=8, steps=args.steps + 1, batch_size=args.batch, max_seq_len=4 * args.tokens,
                         device=args.device, learning_rate=1e-4, text_router=False, relation_batches=1,
                         **OPTIONS[option])
    trainer = Trainer(model_dir, _examples(4 * args.batch, args.tokens, 0), config)
    runner = StepRunner(trainer, torch.zeros(2, 2))
    runner.step(0)  # warm-up
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        runner.step(step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = sum(len(trainer.rows[i][0]) for i in runner.batch_indices(1))
    queue.put({"option": option, "peak_mib": peak / 2**20, "step_s": statistics.median(times), "batch_tokens": tokens})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="words of each user turn (the reply mirrors it)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from server.model.tiny import TinyConfig, write_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shape = TinyConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=max(args.hidden // 64, 1), num_key_value_heads=max(args.hidden // 128, 1),
                           max_position_embeddings=16 * args.tokens)
        model_dir = str(write_checkpoint(Path(tmp), shape))
        context = multiprocessing.get_context("spawn")
        for option in OPTIONS:
            queue = context.Queue()
            process = context.Process(target=_measure, args=(model_dir, option, args, queue))
            process.start()
            rows.append(queue.get())
            process.join()
    plain = rows[0]
    print(f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} ({plain['batch_tokens']} tokens), "
          f"{args.device}; peak {'allocated' if args.device == 'cuda' else 'resident'} memory")
    print(f"{'option':<14}{'peak MiB':>10}{'x plain':>9}{'step s':>9}{'x plain':>9}")
    for row in rows:
        row["peak_ratio"], row["time_ratio"] = row["peak_mib"] / plain["peak_mib"], row["step_s"] / plain["step_s"]
        print(f"{row['option']:<14}{row['peak_mib']:>10.0f}{row['peak_ratio']:>9.2f}{row['step_s']:>9.2f}"
              f"{row['time_ratio']:>9.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
