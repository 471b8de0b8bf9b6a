"""A1, first half, on the saturated preset: full-data SFT on the defect-free training set against a
random 25% of it (all tokens), same epochs, with the plain loop of `qtune.testbed.calibrate`.

    OMP_NUM_THREADS=1 python bench/saturated_a1.py [--epochs 3] [--seeds 0 1 2] [--cache-dir DIR] [--set/--data ...]

"Defect-free" = the training records whose `metadata.defective` is false (clean, misconception and
redundant: 2250 of the default 3000). Each run reports dev exact match after every epoch (A1 asks
that full data's first epoch reach >= 90% of its final value) and test exact match at the end.
Prints one JSON line per run and a summary; `--out` writes them all as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

import torch

from qtune.testbed.calibrate import collate, encode, exact_match, length_batches, read_jsonl
from qtune.testbed.model import PRESETS, build_testbed, load_testbed_model
from qtune.testbed.probe import replace_fields


def train_and_track(paths, records: list[dict], dev: list[dict], *, epochs: int, lr: float, batch_size: int,
                    seed: int) -> tuple[list[float], float, object]:
    """Fine-tune a fresh copy of the base model; dev exact match after each epoch, seconds, model."""
    torch.manual_seed(seed)
    model, tokenizer = load_testbed_model(paths)
    rng = random.Random(seed)
    samples = [encode(tokenizer, r) for r in records]
    lengths = [len(ids) for ids, _ in samples]
    total = epochs * math.ceil(len(samples) / batch_size)
    warmup = max(1, total // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    dev_scores, seconds = [], 0.0
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        for batch in length_batches(lengths, batch_size, rng):
            model(**collate([samples[i] for i in batch], tokenizer.pad_token_id)).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        model.eval()
        hits = exact_match(model, tokenizer, dev)
        dev_scores.append(sum(hits) / len(hits))
    return dev_scores, seconds, (model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--data", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS["saturated"]
    paths = build_testbed(args.cache_dir, preset="saturated", recipe=replace_fields(args.set, preset.recipe),
                          config=replace_fields(args.data, preset.config))
    train = [r for r in read_jsonl(paths.train_path) if not r["metadata"]["defective"]]
    dev, test = read_jsonl(paths.dev_path), read_jsonl(paths.test_path)
    runs = []
    for seed in args.seeds:
        subset = random.Random(f"a1-{seed}").sample(train, round(args.fraction * len(train)))
        for name, records in (("full", train), (f"random{args.fraction:.0%}", subset)):
            dev_scores, seconds, (model, tokenizer) = train_and_track(
                paths, records, dev, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed)
            hits = exact_match(model, tokenizer, test)
            run = {"run": name, "seed": seed, "records": len(records), "dev_by_epoch": dev_scores,
                   "test": sum(hits) / len(hits), "train_seconds": round(seconds, 1), "threads": args.threads}
            print(json.dumps(run), flush=True)
            runs.append(run)
    for name in dict.fromkeys(r["run"] for r in runs):
        scores = [r["test"] for r in runs if r["run"] == name]
        spread = statistics.stdev(scores) if len(scores) > 1 else float("nan")
        print(f"{name}: test {statistics.mean(scores):.1%} +- {spread:.1%} over {len(scores)} seed(s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"key": paths.root.name, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
