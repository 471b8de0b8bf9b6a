"""Calibration of the testbed: base accuracy, a plain full-data SFT run, accuracy after it.

    python -m qtune.testbed.calibrate [--epochs 5] [--lr 1e-3] [--batch-size 16]

Builds (or reuses) the data-starved testbed, measures greedy exact match on the held-out test set
before and after fine-tuning on its whole training set, and prints the timings. It is a
deliberately small, self-contained PyTorch loop (the chat template renders each record, the loss
is on the answer only, AdamW with warmup and cosine decay, batches of similar lengths); the real
trainer is `qtune train`.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch

from qtune.io import read_jsonl
from qtune.testbed.model import build_testbed, load_testbed_model
from qtune.testbed.tasks import final_answer


def encode(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels with -100 on the prompt."""
    user = [{"role": "user", "content": record["question"]}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record["answer"]}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids, "chat template is not prefix-stable"
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of samples of similar length (sorted, chunked), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(samples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), -100)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(samples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def sft(model, tokenizer, records: list[dict], *, epochs: float, lr: float, batch_size: int, seed: int = 0) -> float:
    """Full-data SFT; returns the seconds spent training."""
    rng = random.Random(seed)
    samples = [encode(tokenizer, r) for r in records]
    lengths = [len(ids) for ids, _ in samples]
    steps_per_epoch = math.ceil(len(samples) / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    warmup = max(1, total // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    model.train()
    started = time.perf_counter()
    step = 0
    while step < total:
        for batch in length_batches(lengths, batch_size, rng):
            if step == total:
                break
            loss = model(**collate([samples[i] for i in batch], tokenizer.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == total:
                print(f"  step {step}/{total}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f}s", flush=True)
    model.eval()
    return time.perf_counter() - started


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], *, batch_size: int = 64, max_new_tokens: int = 200) -> list[bool]:
    """Per record, whether the generated `#### N` (greedy decoding) equals the true answer."""
    tokenizer.padding_side = "left"
    hits = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True, tokenize=False)
            for r in chunk
        ]
        inputs = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += [final_answer(t) == r["metadata"]["final"] for t, r in zip(texts, chunk)]
    return hits


def accuracy(records: list[dict], hits: list[bool]) -> str:
    """"41.2% (difficulty 1: 80.0%, 2: ...)": overall exact match and per difficulty."""
    levels = sorted({r["metadata"]["difficulty"] for r in records})
    parts = []
    for level in levels:
        level_hits = [h for h, r in zip(hits, records) if r["metadata"]["difficulty"] == level]
        parts.append(f"{level}: {sum(level_hits) / len(level_hits):.1%}")
    return f"{sum(hits) / len(hits):.1%} (difficulty " + ", ".join(parts) + ")"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="testbed cache root (default: $QTUNE_CACHE or ~/.cache/qtune/testbed)")
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    paths = build_testbed(args.cache_dir, preset="data-starved")
    print(f"testbed: {paths.root} ({time.perf_counter() - started:.0f}s, cached builds take ~0s)")
    model, tokenizer = load_testbed_model(paths)
    train, test = read_jsonl(paths.train_path), read_jsonl(paths.test_path)

    t = time.perf_counter()
    base = exact_match(model, tokenizer, test)
    print(f"base model: exact match {accuracy(test, base)} on {len(test)} test problems ({time.perf_counter() - t:.0f}s)")

    print(f"SFT on {len(train)} records, {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}")
    seconds = sft(model, tokenizer, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    t = time.perf_counter()
    tuned = exact_match(model, tokenizer, test)
    print(f"after SFT: exact match {accuracy(test, tuned)} ({time.perf_counter() - t:.0f}s to evaluate)")
    print(f"SFT training time: {seconds:.0f}s")


if __name__ == "__main__":
    main()
