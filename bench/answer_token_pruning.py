"""Diagnostic: which response tokens does Q-Tuning's Stage 2 prune, the final answer or the rest?

Scores a GSM8K-format training set with a model, triages it in seeded random batches of
--batch-size (as a training epoch would, with one fixed model), prunes the tokens of the Q2
samples at --r-token, and reports per ground-truth category how many Q2 samples there are and
which share of their answer-line tokens (`#### N` and the end-of-sequence token) and of their
other response tokens lose their loss.

    python bench/answer_token_pruning.py --model ~/.cache/qtune/testbed/<key>/model \
        --data ~/.cache/qtune/testbed/<key>/train.jsonl
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict


def answer_line_length(tokenizer, response_ids: list[int]) -> int:
    """How many of the last response tokens make up the final `#### N` line (with its end token)."""
    for k in range(1, len(response_ids) + 1):
        if tokenizer.decode(response_ids[-k:], skip_special_tokens=True).lstrip().startswith("####"):
            return k
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--r-sample", type=float, default=0.25)
    parser.add_argument("--r-token", type=float, default=0.7)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=16, help="samples triaged together, as in training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from qtune.data import load_records, require_pad_token, tokenize_records
    from qtune.models import load_model, load_tokenizer
    from qtune.pruning import prune_tokens, token_perplexity, triage
    from qtune.scoring import IGNORE_INDEX, score_dataset

    tokenizer = load_tokenizer(args.model)
    records, _ = load_records(args.data)
    samples, _ = tokenize_records(records, tokenizer)
    model = load_model(args.model)
    scores = score_dataset(model, samples, pad_token_id=require_pad_token(tokenizer), batch_size=32,
                           per_token=True)
    by_id = {s["sample_id"]: s for s in samples}
    category = {r.sample_id: str(r.metadata.get("category", "all")) for r in records}

    order = list(range(len(scores.sample_id)))
    random.Random(args.seed).shuffle(order)
    q2_count, seen = defaultdict(int), defaultdict(int)
    pruned = defaultdict(lambda: [0, 0, 0, 0])  # answer pruned, answer total, other pruned, other total
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        decision = triage(torch.tensor([scores.ppl[i] for i in batch]), torch.tensor([scores.ent[i] for i in batch]),
                          args.r_sample)
        for j in decision.prune_tokens.nonzero().flatten().tolist():
            i = batch[j]
            sid = scores.sample_id[i]
            sample = by_id[sid]
            response = [t for t, label in zip(sample["input_ids"][1:], sample["labels"][1:]) if label != IGNORE_INDEX]
            tokppl = token_perplexity(torch.tensor(scores.token_nll[i]))[None]
            assert tokppl.shape[1] == len(response), "per-token scores and response positions disagree"
            keep = prune_tokens(tokppl, torch.ones_like(tokppl, dtype=torch.bool), args.r_token, lam=args.lam)[0]
            k = answer_line_length(tokenizer, response)
            counts = pruned[category[sid]]
            counts[0] += int((~keep[len(keep) - k:]).sum())
            counts[1] += k
            counts[2] += int((~keep[:len(keep) - k]).sum())
            counts[3] += len(keep) - k
            q2_count[category[sid]] += 1
        for i in batch:
            seen[category[scores.sample_id[i]]] += 1

    print(f"model {args.model}, r_sample {args.r_sample:g}, r_token {args.r_token:g}, lam {args.lam:g}, "
          f"triaged in batches of {args.batch_size}")
    print("| category | samples | Q2 samples | answer-line tokens pruned | other response tokens pruned |")
    print("|---|---:|---:|---:|---:|")
    for cat in sorted(seen):
        a_pruned, a_total, o_pruned, o_total = pruned[cat]
        print(f"| {cat} | {seen[cat]} | {q2_count[cat]} ({100 * q2_count[cat] / seen[cat]:.1f}%) | "
              f"{100 * a_pruned / max(a_total, 1):.1f}% of {a_total} | {100 * o_pruned / max(o_total, 1):.1f}% of {o_total} |")


if __name__ == "__main__":
    main()
