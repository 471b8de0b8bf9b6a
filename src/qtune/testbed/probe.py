"""Criterion A0 for a testbed's base model: what it knows before any fine-tuning.

    python -m qtune.testbed.probe [--preset saturated] [--threads 1] [--set steps=800 --set num_layers=6 ...]

Builds (or reuses) the preset's testbed, recipe fields replaced by `--set`, and measures on its
base model (greedy decoding throughout):

- arithmetic: `--facts` random facts per operator from `saturated.arithmetic_facts`, prompted as
  "<s>12 + 7 =" (the spaced drill layout); right when the first number generated is the result;
- textbook: the test problems prompted as "<s>Problem: <question>\\nSolution:\\n"; right when the
  first "Answer: N" generated states the true answer (misconception problems included, which the
  pretraining corpus misreads on purpose, so they are also reported apart);
- chat: strict exact match in the chat format (`calibrate.exact_match`: the `#### N` line);
- the build time recorded in recipe.json (only meaningful for a build this command made).

A0 holds when every operator's arithmetic is >= 95%, textbook >= 60%, chat <= 5% and the build
took <= 600 s. Prints one table and, with `--out`, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import time
from pathlib import Path

import torch

from qtune.io import read_jsonl
from qtune.testbed.calibrate import exact_match
from qtune.testbed.model import PRESETS, build_testbed, load_testbed_model
from qtune.testbed.saturated import arithmetic_facts

A0 = {"arithmetic_min": 0.95, "textbook_min": 0.60, "chat_max": 0.05, "build_seconds_max": 600}
_NUMBER = re.compile(r"-?\d+")
_ANSWER = re.compile(r"Answer: (-?\d+)")


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of `prompts` (each already starts with the bos token)."""
    tokenizer.padding_side = "left"
    texts = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def arithmetic_probe(model, tokenizer, max_value: int, *, facts: int = 200, seed: int = 0) -> dict[str, float]:
    """Per operator, the share of `facts` random facts (with replacement) answered right."""
    rng = random.Random(seed)
    scores = {}
    for op, table in arithmetic_facts(max_value).items():
        drawn = [rng.choice(table) for _ in range(facts)]
        texts = _generate(model, tokenizer, [f"{tokenizer.bos_token}{a} {op} {b} =" for a, b, _ in drawn], 3, 256)
        scores[op] = sum(bool(m := _NUMBER.search(t)) and int(m.group()) == r for t, (_, _, r) in zip(texts, drawn)) / facts
    return scores


def textbook_hits(model, tokenizer, records: list[dict], *, max_new_tokens: int = 160, batch_size: int = 64) -> list[bool]:
    """Per record, whether the base model solves it in the pretraining layout."""
    prompts = [f"{tokenizer.bos_token}Problem: {r['question']}\nSolution:\n" for r in records]
    texts = _generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [bool(m := _ANSWER.search(t)) and int(m.group(1)) == r["metadata"]["final"] for t, r in zip(texts, records)]


def _share(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def measure(paths, *, facts: int = 200) -> dict:
    """The A0 numbers of a built saturated testbed, and whether each part passes."""
    info = json.loads((paths.root / "recipe.json").read_text())
    model, tokenizer = load_testbed_model(paths)
    test = read_jsonl(paths.test_path)
    t = time.perf_counter()
    arithmetic = arithmetic_probe(model, tokenizer, info["data"]["max_value"], facts=facts)
    book = textbook_hits(model, tokenizer, test)
    chat = exact_match(model, tokenizer, test)
    by = lambda pred: [h for h, r in zip(book, test) if pred(r["metadata"])]  # noqa: E731
    result = {
        "key": info["key"], "generator_sha256": info.get("generator_sha256"), "parameters": info["parameters"],
        "build_seconds": info["build_seconds"], "recipe": info["recipe"],
        "arithmetic": arithmetic,
        "textbook": _share(book),
        "textbook_clean": _share(by(lambda m: m["category"] == "clean")),
        "textbook_misconception": _share(by(lambda m: m["category"] == "misconception")),
        "textbook_by_difficulty": {d: _share(by(lambda m, d=d: m["difficulty"] == d)) for d in sorted({r["metadata"]["difficulty"] for r in test})},
        "chat_exact_match": _share(chat),
        "probe_seconds": round(time.perf_counter() - t, 1),
    }
    result["pass"] = {
        "arithmetic": min(arithmetic.values()) >= A0["arithmetic_min"],
        "textbook": result["textbook"] >= A0["textbook_min"],
        "chat": result["chat_exact_match"] <= A0["chat_max"],
        "build": info["build_seconds"] <= A0["build_seconds_max"],
    }
    return result


def replace_fields(pairs: list[str], base):
    """`base` (a frozen dataclass) with FIELD=VALUE pairs replaced; values are JSON (lists become tuples)."""
    names = {f.name for f in dataclasses.fields(base)}
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in names:
            raise SystemExit(f"unknown field {name!r} of {type(base).__name__}")
        parsed = json.loads(value)
        changes[name] = tuple(tuple(x) if isinstance(x, list) else x for x in parsed) if isinstance(parsed, list) else parsed
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="saturated", choices=["saturated"])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="replace a ModelRecipe field")
    parser.add_argument("--data", action="append", default=[], metavar="FIELD=VALUE", help="replace a SaturatedConfig field (JSON value)")
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--out", default=None, help="write the numbers here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = replace_fields(args.set, PRESETS[args.preset].recipe)
    config = replace_fields(args.data, PRESETS[args.preset].config)
    paths = build_testbed(args.cache_dir, preset=args.preset, recipe=recipe, config=config)
    result = measure(paths, facts=args.facts)
    result["threads"] = args.threads
    print(json.dumps({k: v for k, v in result.items() if k != "recipe"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
