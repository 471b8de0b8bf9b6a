"""Benchmark (not a test): the head's working block sized to the work (`--chunk-tokens` unset)
against the fixed 128 positions of earlier versions (`--chunk-tokens 128`), side by side in one run.

One tiny Qwen2-like body (bench/step_cost.py's "tiny" preset: hidden 256, 4 layers, untied head,
random weights) with several vocabularies, random tokens (40% of each row prompt, rows of 60-100%
of --length, as length-grouped data looks):

1. memory  Scoring's own memory: `score_batch` over --batches batches of --batch rows, as
           `qtune score` runs them; each (vocabulary, sizing) in a fresh process, which reports
           its peak RSS (VmHWM, reset once the model and batches exist) above its RSS at that
           point (model and batches loaded: "load-only"). The processes run with glibc's mmap
           threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): by default the threshold moves
           with the sizes freed, and the same run's peak varied by +-40 MiB; fixed, every large
           tensor returns to the system when freed and the peak RSS follows the live tensors.
           Target: at a 152k vocabulary within 1.1x of that at 800 tokens.
2. time    At 32k and 152k: a scoring pass (`score_batch`), a training loss forward + backward
           (`micro_batch_loss`) and a Q-Tuning step (`train_step`, r_sample 0.25, r_token 0.7,
           then the optimizer step) of one batch, per sizing, variants alternating, medians.
           Target: auto no slower than 128. At these vocabularies the loss takes 128 positions
           either way (`qtune.head.working_block`), so its row shows the run's noise; the step
           differs by its scoring pass.

CPU only (peak RSS is what it measures). Threads: torch's default, or OMP_NUM_THREADS.

    python bench/head_block.py --out runs/head_block
    python bench/head_block.py --vocabs 800,32000,151936 --time-vocabs 32000,151936 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from step_cost import _peak_rss, _reset_peak_rss, _rss, alternating_medians, build_model, machine, make_batch

SIZINGS = {"auto": None, "128": 128}  # label -> chunk_tokens


def batches(args, vocab: int, count: int) -> list[dict]:
    return [make_batch(vocab, args.batch, args.length, args.prompt_share, args.device, seed=i) for i in range(count)]


def scoring_memory(args, vocab: int, chunk_tokens: int | None) -> dict:
    """In this (fresh) process: the rise of peak RSS above the load-only RSS while scoring."""
    from qtune.scoring import score_batch

    model = build_model(args, vocab).eval()
    data = batches(args, vocab, args.batches)
    loaded = _rss()
    _reset_peak_rss()
    start = time.perf_counter()
    for b in data:
        score_batch(model, b["input_ids"], b["attention_mask"], b["labels"], chunk_tokens=chunk_tokens)
    return {"vocab": vocab, "chunk_tokens": chunk_tokens, "load_only_mib": loaded / 2**20,
            "own_mib": (_peak_rss() - loaded) / 2**20, "seconds": time.perf_counter() - start}


def fresh_process(args, vocab: int, label: str) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--variant", f"{vocab}:{label}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def step_times(args, vocab: int) -> dict:
    """Median seconds of scoring, loss and Q-Tuning step per sizing, variants alternating."""
    from qtune.config import TrainConfig
    from qtune.methods import build_method
    from qtune.scoring import score_batch
    from qtune.step import micro_batch_loss, train_step

    model = build_model(args, vocab)
    batch = batches(args, vocab, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    method = build_method("qtuning", TrainConfig(model="m", data="d", out="o", method="qtuning", r_sample=0.25,
                                                 r_token=0.7))

    def score(chunk_tokens):
        def run():
            model.eval()
            b = batch[0]
            score_batch(model, b["input_ids"], b["attention_mask"], b["labels"], chunk_tokens=chunk_tokens)
        return run

    def loss(chunk_tokens):
        def run():
            model.train()
            micro_batch_loss(model, batch[0], 1000, chunk_tokens=chunk_tokens).backward()
            model.zero_grad(set_to_none=True)
        return run

    def step(chunk_tokens):
        def run():
            model.train()
            train_step(model, batch, method, step=0, total_steps=10, pad_token_id=0, chunk_tokens=chunk_tokens)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    variants = {f"{kind.__name__}/{label}": kind(chunk) for kind in (score, loss, step)
                for label, chunk in SIZINGS.items()}
    return {"vocab": vocab, "seconds": alternating_medians(variants, args)}


def print_tables(result: dict) -> None:
    if result["memory"]:
        print_memory(result)
    if result["time"]:
        print_time(result)


def print_memory(result: dict) -> None:
    print("\n1. scoring's own memory (peak RSS above load-only RSS, MiB)")
    print("| vocab | auto | 128 | auto vs its 800-token value | 128 vs its 800-token value |")
    print("|---:|---:|---:|---:|---:|")
    memory = {(r["vocab"], r["label"]): r["own_mib"] for r in result["memory"]}
    smallest = min(r["vocab"] for r in result["memory"])
    for vocab in sorted({r["vocab"] for r in result["memory"]}):
        auto, fixed = memory[vocab, "auto"], memory[vocab, "128"]
        print(f"| {vocab} | {auto:.0f} | {fixed:.0f} | **{auto / memory[smallest, 'auto']:.2f}x** | "
              f"{fixed / memory[smallest, '128']:.2f}x |")


def print_time(result: dict) -> None:
    print("\n2. time (ms, medians)")
    print("| vocab | pass | auto | 128 | auto / 128 |")
    print("|---:|---|---:|---:|---:|")
    for row in result["time"]:
        for kind in ("score", "loss", "step"):
            auto, fixed = row["seconds"][f"{kind}/auto"], row["seconds"][f"{kind}/128"]
            print(f"| {row['vocab']} | {kind} | {auto * 1000:.0f} | {fixed * 1000:.0f} | **{auto / fixed:.2f}** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="memory,time", help="which of the two to run")
    parser.add_argument("--vocabs", default="800,32000,151936", help="vocabularies of the memory item")
    parser.add_argument("--time-vocabs", default="32000,151936", help="vocabularies of the time item")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch")
    parser.add_argument("--batches", type=int, default=8, help="batches scored in the memory item")
    parser.add_argument("--length", type=int, default=256, help="tokens of the longest row")
    parser.add_argument("--prompt-share", type=float, default=0.4, help="share of each row that is prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the time item")
    parser.add_argument("--out", default="runs/head_block", help="folder for head_block.json")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # What step_cost.build_model reads.
    args.preset, args.device, args.dtype, args.attn, args.lengths = "tiny", "cpu", "float32", "sdpa", [args.length]
    args.model, args.lora_r = None, 0  # the preset's random weights, not a named model
    if args.variant:
        vocab, label = args.variant.split(":")
        print(json.dumps(scoring_memory(args, int(vocab), SIZINGS[label])))
        return
    result = {"command": "python bench/head_block.py " + " ".join(sys.argv[1:]), "machine": machine(args),
              "date": time.strftime("%Y-%m-%d"), "memory": [], "time": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = args.items.split(",")
    for vocab in (int(v) for v in args.vocabs.split(",")) if "memory" in items else ():
        for label in SIZINGS:  # alternating sizings, each in a fresh process
            print(f"memory: vocab {vocab}, chunk_tokens {label} ...", file=sys.stderr, flush=True)
            result["memory"].append({**fresh_process(args, vocab, label), "label": label})
    for vocab in (int(v) for v in args.time_vocabs.split(",")) if "time" in items else ():
        print(f"time: vocab {vocab} ...", file=sys.stderr, flush=True)
        result["time"].append(step_times(args, vocab))
    (out / "head_block.json").write_text(json.dumps(result, indent=1))
    print(f"{result['command']}\n{result['machine']}, {result['date']}")
    print_tables(result)


if __name__ == "__main__":
    main()
