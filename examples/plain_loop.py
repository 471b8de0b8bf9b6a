"""Q-Tuning in a plain PyTorch training loop, with qtune's public functions only.

    python examples/plain_loop.py MODEL DATA.jsonl --steps 100 --batch-size 8 --r-sample 0.25 --r-token 0.7

MODEL is a local folder or hub id of a causal LM; DATA is a file `qtune train` reads (JSONL with
`messages`, `prompt`/`completion`, `question`/`answer`, alpaca or sharegpt records). Each step:

1. score the batch with the current weights, without gradients (`qtune.score_batch`);
2. Stage 1: triage the samples on the Error-Uncertainty plane and keep Q2 + Q4 (`qtune.triage`);
3. Stage 2: in the Q2 samples, drop the loss of the response tokens with the highest
   neighbour-aware perplexity (`qtune.prune_tokens`);
4. forward and backward on the kept samples only, the loss averaged over the kept tokens.

`qtune train` runs the same step with gradient accumulation, mixed precision, checkpoints and
logs; this file shows what the step is, to copy into a loop of your own.
"""

import argparse

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import qtune
from qtune.data import collate, load_records, require_pad_token, tokenize_records

IGNORE_INDEX = -100  # label of a position without loss


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="local folder or hub id of a causal language model")
    parser.add_argument("data", help="training file (.jsonl, .json, .parquet, .csv)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step, before pruning")
    parser.add_argument("--r-sample", type=float, default=0.25, help="fraction of each batch's samples trained on")
    parser.add_argument("--r-token", type=float, default=0.7, help="fraction of response tokens kept in Q2 samples")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sample; longer ones are cut")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order")
    parser.add_argument("--out", help="folder to save the trained model and tokenizer in")
    return parser.parse_args()


def main():
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    records, _ = load_records(args.data)
    samples, _ = tokenize_records(records, tokenizer, max_length=args.max_length)
    pad_id = require_pad_token(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist()

    for step in range(args.steps):
        first = step * args.batch_size
        picked = [samples[order[(first + i) % len(samples)]] for i in range(args.batch_size)]
        batch = {k: v.to(device) for k, v in collate(picked, pad_id).items()}

        model.eval()  # scores come from the current weights, without dropout
        scores = qtune.score_batch(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        decision = qtune.triage(scores.ppl, scores.ent, args.r_sample)
        keeps_loss = qtune.prune_tokens(qtune.token_perplexity(scores.nll), scores.response_mask, args.r_token,
                                        rows=decision.prune_tokens)

        rows = decision.keep  # dropped samples cost no forward and no backward pass
        # Pruned tokens stay in the input as context; only their loss goes.
        labels = batch["labels"][rows].masked_fill(~keeps_loss[rows], IGNORE_INDEX)
        model.train()
        logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
        # Position t predicts token t + 1: the mean over kept tokens, in float32.
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        kept_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        print(f"step {step + 1}: loss {loss.item():.4f}, kept {rows.numel()}/{len(picked)} samples, "
              f"{kept_tokens}/{int(scores.response_mask.sum())} response tokens", flush=True)

    if args.out:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
