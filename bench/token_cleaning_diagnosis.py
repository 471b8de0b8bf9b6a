"""Why does Token Cleaning collapse on the saturated preset? (docs/bench.md, "Token Cleaning's collapse")

    OMP_NUM_THREADS=1 python bench/token_cleaning_diagnosis.py [--grid runs/grid-saturated/b4]
                                                             [--out runs/token-cleaning-diagnosis] [--seed 0]

Hypothesis, written before this script first ran: Token Cleaning's masks are fixed once for the
whole run and cut at one global threshold of an influence (initial NLL minus the reference's) that
is near zero for the tokens the base model already predicts. So some token *types* (line breaks,
full stops, sentence openers) keep their loss at few of their appearances, the same ones every
epoch, where random token pruning trains every type at about r_token of its appearances; the
model trained on those masks then loses those types, and its answers derail there.

What it measures, for one seed at 25% of the samples x 50% of the tokens:

1. It retrains the grid's `random+token_cleaning` and `random` cells (GRID/cells/<cell>/train/
   run_config.json, only `out` changed) and keeps their models. CPU training is deterministic, so
   these are the grid's weights; the script checks that their strict exact match on the test set
   equals the grid's.
2. From the Token Cleaning masks, each token type's kept share over the training set; the types
   fall in buckets by that share.
3. On the test problems' reference responses (teacher-forced), per bucket: the share of the
   reference tokens, and the top-1 accuracy (argmax = the reference token) and mean NLL of the base
   model, the random model and the Token Cleaning model.
4. In each model's greedy answers, the bucket of the reference token at the first token where the
   answer departs from the reference response.

Verdict criteria, fixed before the first run: the hypothesis is supported when (a) the Token
Cleaning model's top-1 accuracy deficit against the random model is at least 2 points larger in
the lowest bucket (kept share < 25%) than in the highest (>= 75%), and (b) the Token Cleaning
model's first departures fall in the lowest bucket at least 1.5 times as often as that bucket's
share of reference tokens, and more often than the random model's do. Resumable: a model already
trained in OUT is reused. Writes OUT/diagnosis.json and prints the tables as Markdown.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import torch

from qtune.config import EvalConfig, TrainConfig
from qtune.data import Record, load_records, tokenize_records
from qtune.evaluate import evaluate_exact_match
from qtune.io import write_json
from qtune.models import load_model, load_tokenizer
from qtune.report import format_table
from qtune.scoring import response_positions
from qtune.testbed import PRESETS, build_testbed
from qtune.train import TOKEN_MASKS, read_token_masks, run_train

METHODS = ("random+token_cleaning", "random")
BUDGET = "r0.25x0.5"
#: Buckets of a token type's kept share under the Token Cleaning masks: [low, high).
BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01))
#: The most frequent reference token types listed one by one.
TYPES_SHOWN = 20


def bucket_name(share: float | None) -> str:
    if share is None:
        return "not in training"
    low, high = next(b for b in BUCKETS if b[0] <= share < b[1])
    return f"{100 * low:.0f}-{min(100, 100 * high):.0f}%"


def response_ids(sample: dict) -> tuple[list[int], list[int]]:
    """The sample's input ids and the positions (in input_ids) of its response tokens
    (`qtune.scoring.response_positions`)."""
    ids = [int(i) for i in sample["input_ids"]]
    return ids, response_positions(torch.as_tensor(sample["labels"])[None])[0].nonzero().flatten().tolist()


def type_kept_shares(masks_path: Path, train_samples: dict[int, dict]) -> dict[int, float]:
    """token id -> the share of its response-token appearances in the training set that the
    stored Token Cleaning masks keep."""
    masks = read_token_masks(masks_path)
    offsets, keep = masks.offsets.tolist(), masks.keep.tolist()
    seen, kept = collections.Counter(), collections.Counter()
    for row, sample_id in enumerate(masks.sample_id.tolist()):
        ids, positions = response_ids(train_samples[sample_id])
        flags = keep[offsets[row]:offsets[row + 1]]
        assert len(flags) == len(positions), f"sample {sample_id}: the masks do not fit its tokenisation"
        for k, flag in zip(positions, flags):
            seen[ids[k]] += 1
            kept[ids[k]] += flag
    return {t: kept[t] / seen[t] for t in seen}


@torch.no_grad()
def teacher_forced(model, samples: list[dict]) -> dict[int, collections.Counter]:
    """Per reference token type (id): its tokens in the response, the top-1 hits and summed NLL of
    `model` on them."""
    per_type = collections.defaultdict(collections.Counter)
    for sample in samples:
        ids, positions = response_ids(sample)
        logits = model(torch.tensor([ids])).logits[0].float()
        predicting = torch.tensor(positions) - 1  # the logits at k-1 predict the token at k
        gold = torch.tensor([ids[k] for k in positions])
        nll = torch.nn.functional.cross_entropy(logits[predicting], gold, reduction="none")
        right = logits[predicting].argmax(dim=-1) == gold
        for token, loss, hit in zip(gold.tolist(), nll.tolist(), right.tolist()):
            per_type[token].update(tokens=1, right=hit, nll=loss)
    return per_type


def by_bucket(per_type: dict[int, collections.Counter], bucket_of) -> dict[str, dict]:
    """teacher_forced's counts summed per bucket: tokens, top-1 accuracy, mean NLL."""
    totals = collections.defaultdict(collections.Counter)
    for token, c in per_type.items():
        totals[bucket_of(token)].update(c)
    return {b: {"tokens": c["tokens"], "top1": c["right"] / c["tokens"], "nll": c["nll"] / c["tokens"]}
            for b, c in totals.items()}


def first_departures(records: list[Record], samples: dict[int, dict], predictions: list[dict], tokenizer,
                     bucket_of, max_length: int) -> collections.Counter:
    """Bucket of the reference token at each answer's first departure from the reference response
    (answers equal to the reference are not counted). Both are tokenised as the training set is."""
    answers = [dataclasses.replace(r, messages=[*r.messages[:-1], {"role": "assistant", "content": p["output"]}])
               for r, p in zip(records, predictions)]
    tokenized, _ = tokenize_records(answers, tokenizer, max_length=max_length)
    departures = collections.Counter()
    for answer in tokenized:
        ids, positions = response_ids(samples[int(answer["sample_id"])])
        reference = [ids[k] for k in positions]
        given_ids, given_positions = response_ids(answer)
        given = [given_ids[k] for k in given_positions]
        k = next((k for k, (a, b) in enumerate(zip(reference, given)) if a != b), min(len(reference), len(given)))
        if k < len(reference):
            departures[bucket_of(reference[k])] += 1
    return departures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="runs/grid-saturated/b4", help="Part A's bench folder (its cells/).")
    parser.add_argument("--out", default="runs/token-cleaning-diagnosis")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    grid, out = Path(ns.grid), Path(ns.out)
    paths = build_testbed(preset="saturated", progress=False)
    settings = PRESETS["saturated"].sft_settings
    tokenizer = load_tokenizer(str(paths.model_dir))

    models, accuracy = {"base": load_model(str(paths.model_dir), dtype="float32", device="cpu")}, {}
    predictions = {}
    test_records, _ = load_records(paths.test_path, "auto")
    for method in METHODS:
        cell = grid / "cells" / f"{method}-{BUDGET}-seed{ns.seed}"
        values = json.loads((cell / "train" / "run_config.json").read_text())
        max_length = values["max_length"]
        run = out / method
        if not (run / "summary.json").exists():
            run_train(TrainConfig(**{**values, "out": str(run), "progress": False}))
        models[method] = load_model(str(run / "model"), dtype="float32", device="cpu")
        metrics, predictions[method] = evaluate_exact_match(
            models[method], tokenizer, test_records,
            EvalConfig(max_new_tokens=settings["max_new_tokens"], batch_size=settings["eval_batch_size"]),
            progress=False)
        accuracy[method] = {"here": metrics["exact_match_strict"],
                            "grid": json.loads((cell / "result.json").read_text())["exact_match_strict"]}

    train_records, _ = load_records(paths.train_path, "auto")
    train_samples = {int(s["sample_id"]): s
                     for s in tokenize_records(train_records, tokenizer, max_length=max_length)[0]}
    shares = type_kept_shares(out / METHODS[0] / TOKEN_MASKS, train_samples)
    bucket_of = lambda token: bucket_name(shares.get(token))  # noqa: E731
    test_samples = {int(s["sample_id"]): s for s in tokenize_records(test_records, tokenizer, max_length=max_length)[0]}
    per_type = {name: teacher_forced(model, list(test_samples.values())) for name, model in models.items()}
    departures = {method: first_departures(test_records, test_samples, predictions[method], tokenizer, bucket_of,
                                           max_length) for method in METHODS}
    frequent = sorted(per_type["base"], key=lambda t: -per_type["base"][t]["tokens"])[:TYPES_SHOWN]
    result = {
        "seed": ns.seed,
        "exact_match_strict": accuracy,
        "buckets": {name: by_bucket(counts, bucket_of) for name, counts in per_type.items()},
        "departures": departures,
        "frequent_types": [{"token": tokenizer.decode([t]), "kept_share": shares.get(t),
                            "reference_tokens": per_type["base"][t]["tokens"],
                            **{f"top1_{name}": per_type[name][t]["right"] / per_type[name][t]["tokens"]
                               for name in per_type}} for t in frequent],
    }
    write_json(out / "diagnosis.json", result)
    print(report(result))


def report(result: dict) -> str:
    """diagnosis.json as Markdown tables."""
    names = list(result["buckets"])
    lines = [f"Seed {result['seed']}; strict exact match on the test set, retrained here (the grid's): "
             + ", ".join(f"{m} {100 * a['here']:.1f}% ({100 * a['grid']:.1f}%)"
                         for m, a in result["exact_match_strict"].items()), ""]
    order = [bucket_name(low) for low, _ in BUCKETS] + [bucket_name(None)]
    present = [b for b in order if b in result["buckets"]["base"]]
    total = sum(result["buckets"]["base"][b]["tokens"] for b in present)
    departed = {m: sum(result["departures"][m].values()) for m in METHODS}
    header = (["type kept share (Token Cleaning masks)", "reference tokens"]
              + [f"top-1 {n} %" for n in names] + [f"NLL {n}" for n in names]
              + [f"first departures {m} %" for m in METHODS])
    rows = []
    for b in present:
        cells = result["buckets"]
        rows.append([b, f"{cells['base'][b]['tokens']:,} ({100 * cells['base'][b]['tokens'] / total:.1f}%)"]
                    + [f"{100 * cells[n][b]['top1']:.1f}" for n in names]
                    + [f"{cells[n][b]['nll']:.3f}" for n in names]
                    + [f"{100 * result['departures'][m].get(b, 0) / max(1, departed[m]):.1f}" for m in METHODS])
    lines += [format_table(header, rows), "",
              "Answers that depart from the reference response: "
              + ", ".join(f"{m} {departed[m]}" for m in METHODS), ""]
    header = ["token", "kept share", "reference tokens"] + [f"top-1 {n} %" for n in names]
    rows = [[repr(t["token"]), "-" if t["kept_share"] is None else f"{100 * t['kept_share']:.1f}%",
             f"{t['reference_tokens']:,}"] + [f"{100 * t[f'top1_{n}']:.1f}" for n in names]
            for t in result["frequent_types"]]
    return "\n".join(lines + [format_table(header, rows)])


if __name__ == "__main__":
    main()
