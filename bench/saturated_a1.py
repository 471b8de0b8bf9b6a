"""A1 and A2's early-stopping baseline on the saturated preset, with the plain loop of
`qtune.testbed.calibrate`: full-data SFT against a random 25% of the same records (all tokens),
same epochs, dev and test exact match after every epoch.

    OMP_NUM_THREADS=1 python bench/saturated_a1.py [--records defect-free|clean|all] [--epochs 3] [--seeds 0 1 2] [--out FILE]
        [--lr 3e-4 --batch-size 4] [--dev-only] [--lora-r R --lora-alpha A] [--data FIELD=JSON ...]

`--dev-only` skips the test split (for choosing settings on dev); `--lora-r` fine-tunes LoRA adapters
on every linear layer instead of all weights, as `qtune train --lora-r` does.

`--records defect-free` (A1, the default): the defect-free version of the training set
(`saturated.defect_free`: the same 3000 records' size and misconception and redundant shares, the
defective categories' share drawn as clean records); A1 asks that the random 25% reach full data -
1 std and that full data's dev score after the first epoch reach >= 90% of its final value.
`--records clean`: the training set minus its defective records (1950 of the default 3000: what
the `oracle` control keeps), the reading of A1 until generator 7455841f....
`--records all` (A2): the whole noisy training set; the test score at the epoch with the best dev
score is the "best early-stopped full-data checkpoint" the oracle must beat by 2 std.
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

from qtune.io import read_jsonl
from qtune.testbed.calibrate import collate, encode, exact_match, length_batches
from qtune.testbed.model import PRESETS, build_testbed, load_testbed_model
from qtune.testbed.probe import replace_fields
from qtune.testbed.saturated import defect_free


def train_and_track(paths, records: list[dict], dev: list[dict], test: list[dict], *, epochs: int, lr: float,
                    batch_size: int, seed: int, lora_r: int = 0, lora_alpha: int = 16) -> tuple[list[float], list[float], float]:
    """Fine-tune a fresh copy of the base model; dev and test exact match after each epoch (an empty
    `test` list is not evaluated: its scores are NaN), seconds."""
    torch.manual_seed(seed)
    model, tokenizer = load_testbed_model(paths)
    if lora_r:  # as `qtune train --lora-r` does (qtune.train._apply_lora, all linear layers)
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    rng = random.Random(seed)
    samples = [encode(tokenizer, r) for r in records]
    lengths = [len(ids) for ids, _ in samples]
    total = epochs * math.ceil(len(samples) / batch_size)
    warmup = max(1, total // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    dev_scores, test_scores, seconds = [], [], 0.0
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
        for records_, scores in ((dev, dev_scores), (test, test_scores)):
            hits = exact_match(model, tokenizer, records_) if records_ else []
            scores.append(sum(hits) / len(hits) if hits else float("nan"))
        print(f"  epoch {len(dev_scores)}: dev {dev_scores[-1]:.1%} test {test_scores[-1]:.1%} "
              f"({seconds:.0f} s training)", flush=True)
    return dev_scores, test_scores, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--records", default="defect-free", choices=["defect-free", "clean", "all"])
    parser.add_argument("--runs", default="full,random", help="which of the two runs to make (comma-separated)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--data", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--dev-only", action="store_true",
                        help="evaluate dev only (for choosing settings; the test scores are NaN)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS["saturated"]
    config = replace_fields(args.data, preset.config)
    paths = build_testbed(args.cache_dir, preset="saturated", recipe=replace_fields(args.set, preset.recipe),
                          config=defect_free(config) if args.records == "defect-free" else config)
    train = [r for r in read_jsonl(paths.train_path) if args.records != "clean" or not r["metadata"]["defective"]]
    dev, test = read_jsonl(paths.dev_path), ([] if args.dev_only else read_jsonl(paths.test_path))
    runs = []
    for seed in args.seeds:
        subset = random.Random(f"a1-{seed}").sample(train, round(args.fraction * len(train)))
        for name, records in (("full", train), (f"random{args.fraction:.0%}", subset)):
            if name.rstrip("%0123456789") not in args.runs.split(","):
                continue
            dev_scores, test_scores, seconds = train_and_track(
                paths, records, dev, test, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed,
                lora_r=args.lora_r, lora_alpha=args.lora_alpha)
            best = max(range(len(dev_scores)), key=lambda e: (dev_scores[e], -e))  # earliest best dev epoch
            run = {"run": name, "seed": seed, "records": len(records), "dev_by_epoch": dev_scores,
                   "test_by_epoch": test_scores, "test": test_scores[-1], "best_dev_epoch": best + 1,
                   "test_at_best_dev": test_scores[best], "train_seconds": round(seconds, 1), "threads": args.threads}
            print(json.dumps(run), flush=True)
            runs.append(run)
    for name in dict.fromkeys(r["run"] for r in runs):
        for field in ("test", "test_at_best_dev"):
            scores = [r[field] for r in runs if r["run"] == name]
            spread = statistics.stdev(scores) if len(scores) > 1 else float("nan")
            print(f"{name}: {field} {statistics.mean(scores):.1%} +- {spread:.1%} over {len(scores)} seed(s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"key": paths.root.name, "records": args.records, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
