"""Data pruning for RL: drop the prompts whose group of completions all earn the same reward.

GRPO's advantage is a completion's reward relative to its group (minus the group mean, divided by
the group's spread). A group whose rewards all agree (every completion right, or every one wrong)
has advantage 0 everywhere: it costs generation and a forward and backward pass, and moves no
weight (under `loss_type=dapo` it still counts in the token normalisation, diluting the others).

qtune prunes such prompts once, before training (a pre-pass, not DAPO's dynamic resampling, which
GRPOTrainer has no hook for): the start model samples a group for every prompt exactly as the
trainer will (same group size, temperature, top-p, length limit, stop tokens), the run's reward
functions score it with their weights, and the prompts whose weighted rewards have zero spread are
dropped. The verdict is the start model's: a prompt may gain spread as the policy moves, which
the pre-pass cannot see.
"""

from __future__ import annotations

import collections
import math
import time

import torch
from trl.trainer.utils import get_callable_name

from ..evaluate import left_pad
from .prompts import PromptSet


def zero_variance(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [P, G] (the weighted total of each completion of each prompt's group) -> bool [P]:
    True where the group's standard deviation (unbiased) is 0 to `torch.isclose`'s tolerance, as
    GRPOTrainer's `frac_reward_zero_std` counts it: every completion earned the same reward. NaN
    rewards (no reward applied) are left out; a group with fewer than two rewards left has no spread."""
    finite = ~torch.isnan(rewards)
    counts = finite.sum(dim=1)
    values = torch.where(finite, rewards, torch.zeros(()))
    mean = values.sum(dim=1) / counts.clamp(min=1)
    squares = torch.where(finite, (rewards - mean[:, None]) ** 2, torch.zeros(())).sum(dim=1)
    std = torch.sqrt(squares / (counts - 1).clamp(min=1))
    return (counts < 2) | torch.isclose(std, torch.zeros(()))


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion in GRPOTrainer: the tokenizer's EOS and every EOS the model's
    generation config declares."""
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return declared if tokenizer.eos_token_id in declared else [tokenizer.eos_token_id, *declared]


def sample_groups(model, tokenizer, prompts: list[str], *, num_generations: int, temperature: float, top_p: float,
                  max_new_tokens: int, prompts_per_batch: int) -> tuple[list[str], list[list[int]]]:
    """`num_generations` sampled completions of every prompt, prompt by prompt (the completions of
    prompt i are items i*G .. i*G + G - 1): their texts (decoded without special tokens) and token
    ids up to and including the first stop token, as GRPOTrainer samples and cuts them."""
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts, ids = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), prompts_per_batch):
            # Encoded as GRPOTrainer encodes a text prompt: with the tokenizer's special tokens.
            batch = [tokenizer(p)["input_ids"] for p in prompts[start:start + prompts_per_batch]]
            input_ids, attention_mask = left_pad(batch, pad_id)
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
                    num_return_sequences=num_generations, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=0, pad_token_id=pad_id, eos_token_id=stops,
                )
            for row in generated[:, input_ids.shape[1]:].tolist():
                end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
                ids.append(row[:end])
                texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts, ids


def group_rewards(reward_funcs, weights: list[float], prompts: PromptSet, texts: list[str],
                  ids: list[list[int]], num_generations: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted total reward [P, G] of every sampled completion, and each reward function's
    mean, with the keyword arguments GRPOTrainer gives the functions (its `trainer_state`,
    `log_extra` and `log_metric` replaced by None and functions that do nothing: no trainer runs
    yet). A None reward counts as NaN, and NaN is left out of the sums, as in GRPOTrainer."""
    repeat = lambda column: [v for v in column for _ in range(num_generations)]  # noqa: E731
    columns = {name: repeat(values) for name, values in prompts.columns().items()}
    kwargs = {k: v for k, v in columns.items() if k != "prompt"}
    totals = torch.zeros(len(texts))
    applied = torch.zeros(len(texts), dtype=torch.bool)
    means = {}
    for func, weight in zip(reward_funcs, weights):
        values = func(prompts=columns["prompt"], completions=texts, completion_ids=ids, trainer_state=None,
                      log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **kwargs)
        values = torch.tensor([math.nan if v is None else float(v) for v in values])
        seen = ~torch.isnan(values)
        totals += torch.where(seen, values * weight, torch.zeros(()))
        applied |= seen
        means[get_callable_name(func)] = values[seen].mean().item() if seen.any() else math.nan
    totals[~applied] = math.nan
    return totals.view(len(prompts), num_generations), means


def prune_zero_variance(model, tokenizer, prompts: PromptSet, reward_funcs, weights: list[float], *,
                        num_generations: int, temperature: float, top_p: float, max_new_tokens: int,
                        prompts_per_batch: int, seed: int) -> tuple[list[bool], dict]:
    """The pre-pass: which prompts to keep (a group with spread) and its report: prompts, kept,
    dropped, `dropped_by_reward` (how many dropped groups earned each constant total: with
    exact_match alone, "1" counts the groups all right and "0" those all wrong), each reward's
    mean over the sampled completions, completion tokens, seconds, and per prompt its sample_id,
    mean reward and whether it was kept."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    texts, ids = sample_groups(model, tokenizer, prompts.prompt, num_generations=num_generations,
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               prompts_per_batch=prompts_per_batch)
    rewards, means = group_rewards(reward_funcs, weights, prompts, texts, ids, num_generations)
    flat = zero_variance(rewards)
    keep = (~flat).tolist()
    group_mean = torch.nanmean(rewards, dim=1)
    report = {
        "prompts": len(prompts),
        "dropped": int(flat.sum()),
        "kept": len(prompts) - int(flat.sum()),
        "dropped_by_reward": dict(sorted(collections.Counter(
            f"{m:g}" for m, k in zip(group_mean.tolist(), keep) if not k).items())),
        "num_generations": num_generations,
        "reward_means": means,
        "completion_tokens": sum(len(i) for i in ids),
        "seconds": time.perf_counter() - started,
        "groups": [{"sample_id": s, "mean_reward": None if math.isnan(m) else m, "kept": k}
                   for s, m, k in zip(prompts.sample_id, group_mean.tolist(), keep)],
    }
    return keep, report
