"""Generation-based exact match on GSM8K-format answers, scored like lm-evaluation-harness.

Answers are extracted and compared exactly as the harness's `gsm8k` task (lm-eval 0.4) does:

- "strict-match" takes the number after the first `#### ` in the output;
- "flexible-extract" takes the last number-like run in the output;
- both sides are normalised before the string comparison: commas, `$`, everything up to the
  last `#### ` and one trailing period are removed, and case is ignored.

Generation is batched greedy decoding with left padding and the KV cache. Held-out perplexity is
not computed here: it comes from `qtune.scoring`, and a caller merges it into the metrics dict
before `write_eval_outputs`.
"""

from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path

import torch

from .config import EvalConfig
from .chat_templates import render_prompt, render_segments
from .errors import QTuneError
from .io import write_json, write_jsonl

# The harness's regular expressions (lm_eval/tasks/gsm8k/gsm8k.yaml), kept verbatim.
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# `regexes_to_ignore` of its exact_match metric, applied in this order, then lower-casing.
IGNORE_PATTERNS = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))

#: Stop strings of the harness's gsm8k task; the tokenizer's EOS always stops as well.


def extract_strict(text: str) -> str | None:
    """The number after the first `#### `, or None where the harness reports "[invalid]"."""
    matches = STRICT_PATTERN.findall(text)
    return matches[0].strip() if matches else None


def extract_flexible(text: str) -> str | None:
    """The last number-like run in `text` (the harness's group_select=-1), or None.

    Each match fills exactly one of the pattern's two groups; the filled one is the answer.
    """
    matches = FLEXIBLE_PATTERN.findall(text)
    if not matches:
        return None
    return next(group for group in matches[-1] if group).strip()


def normalize_number(s: str) -> str:
    """The harness's exact-match normalisation: drop `,`, `$`, text up to `#### `, a final `.`."""
    for pattern in IGNORE_PATTERNS:
        s = pattern.sub("", s)
    return s.lower()


def gold_answer(answer_field: str) -> str:
    """The normalised reference of a GSM8K answer: the text after its last `#### `.

    An answer without `#### ` is normalised whole, as the harness does. Surrounding whitespace
    is stripped (the harness does not; no GSM8K answer has any, and a user file's stray newline
    should not make every prediction wrong).
    """
    return normalize_number(answer_field.strip())


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether an extracted prediction matches `gold`, itself already normalised by `gold_answer`."""
    return pred is not None and normalize_number(pred) == gold


def _stop_token_ids(model, tokenizer, stop) -> list[int]:
    """EOS ids of the tokenizer and the model, plus every stop string that is one special token."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    for s in stop:
        encoded = tokenizer.encode(s, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] in special:
            ids.add(encoded[0])
    return sorted(ids)


def _truncate_at_stop(text: str, stop) -> str:
    """Cut `text` before each stop string in turn, as the harness's post-processing does."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


def _encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a rendered prompt; its BOS, if any, is already part of the rendered text."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` [B, longest], padding on the left so every prompt ends
    at the last column and generation continues each one right after its own text."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop=(),
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts`, in their order, each cut before its first stop string.

    Prompts are sorted by token length (longest first, so memory errors come at once) and
    generated `batch_size` at a time with left padding, an attention mask and the KV cache.
    A sequence ends at an EOS token, at a stop string that is a single special token, or when
    it contains a stop string; the decoded text is then cut before the stop string.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise QTuneError("batch_size and max_new_tokens must be at least 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise QTuneError("the tokenizer has neither a pad nor an EOS token; set one (--pad-token)")
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    stop_ids = _stop_token_ids(model, tokenizer, stop)
    device = next(model.parameters()).device

    encoded = [_encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()  # dropout would make greedy decoding random
    bar = tqdm(total=len(prompts), unit="sample", desc="generating", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in rows], pad_id)
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=pad_id,
                    eos_token_id=stop_ids or None,
                    # Ends a sequence as soon as it holds a stop string, which saves generating
                    # the rest of a made-up next question; the text is still cut below.
                    stop_strings=list(stop) or None,
                    tokenizer=tokenizer,
                )
            continuations = generated[:, input_ids.shape[1] :].tolist()
            for i, tokens in zip(rows, continuations):
                end = next((k for k, t in enumerate(tokens) if t in stop_ids), len(tokens))
                text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
                outputs[i] = _truncate_at_stop(text, stop)
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return outputs


def end_of_turn(tokenizer) -> str | None:
    """The special token that ends an assistant turn in the tokenizer's rendering, if any.

    A model trained on that rendering emits it (e.g. `<|im_end|>`) where its answer ends, and it
    need not be the EOS, so generation must stop on it too or the model writes a next turn.
    """
    probe = "42"
    conversation = [{"role": "user", "content": "1"}, {"role": "assistant", "content": probe}]
    try:
        segments = render_segments(conversation, tokenizer)
    except QTuneError:
        return None
    trained = "".join(text for text, trainable in segments if trainable)
    tail = trained[trained.rfind(probe) + len(probe) :] if probe in trained else ""
    special = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return next((token for token in sorted(special, key=len, reverse=True) if tail.startswith(token)), None)


def _split_reference(record) -> tuple[list[dict], str]:
    """The record's conversation before its final assistant turn, and that turn's text."""
    messages = record.messages
    if not messages or messages[-1].get("role") != "assistant":
        raise QTuneError(
            f"sample {record.sample_id}: the last message must be the assistant's reference answer"
        )
    return messages[:-1], messages[-1]["content"]


def build_prompts(records, tokenizer, num_fewshot: int = 0, fewshot_records=None, seed: int = 1234) -> list[str]:
    """Render each record up to the generation prompt of its final (reference) assistant turn.

    With `num_fewshot` > 0, each prompt gets its own `num_fewshot` solved examples, drawn
    without replacement from `fewshot_records` by one generator seeded with `seed` (the record
    itself is never among them) and placed as earlier user/assistant turns of the same
    conversation, after the record's system message if it has one.
    """
    pool = list(fewshot_records or [])
    rng = random.Random(seed)
    prompts = []
    for record in records:
        history = _split_reference(record)[0]
        system = [m for m in history[:1] if m.get("role") == "system"]
        shots: list[dict] = []
        if num_fewshot > 0:
            # One spare draw replaces the record itself when the pool contains it.
            drawn = rng.sample(pool, min(num_fewshot + 1, len(pool)))
            chosen = [r for r in drawn if r.messages != record.messages][:num_fewshot]
            if len(chosen) < num_fewshot:
                raise QTuneError(f"{num_fewshot}-shot prompts need more few-shot records than {len(pool)}")
            for shot in chosen:
                shots.extend(m for m in shot.messages if m.get("role") != "system")
        prompts.append(render_prompt(system + shots + history[len(system) :], tokenizer))
    return prompts


def _mean_and_stderr(values: list[bool]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as the harness reports.

    The error is None for a single sample (JSON has no NaN).
    """
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _place_model(model, device: str):
    """`auto` leaves the model where it is; a named device moves it there."""
    if device == "auto":
        return model
    from .models import resolve_device

    return model.to(resolve_device(device))


def evaluate_exact_match(model, tokenizer, records, config: EvalConfig, *, fewshot_records=None, progress: bool = True):
    """Generate an answer for every record and score it with both harness filters.

    Returns `(metrics, predictions)`. `metrics` holds `n`, `exact_match_strict`,
    `exact_match_flexible` (fractions in [0, 1]) with their `_stderr`, the fraction of outputs
    with no extractable answer (`invalid_strict`, `invalid_flexible`), `num_fewshot`,
    `max_new_tokens`, `seconds` and `samples_per_second`. Only generation metrics are computed;
    held-out perplexity comes from `qtune.scoring` and is merged into `metrics` by the caller.
    `predictions` has one dict per record, in record order (see docs/evaluate.md).
    """
    records = list(records)[: config.limit] if config.limit is not None else list(records)
    if not records:
        raise QTuneError("no records to evaluate")
    if config.num_fewshot > 0 and not fewshot_records:
        raise QTuneError(f"num_fewshot={config.num_fewshot} needs few-shot records (e.g. the train split)")
    model = _place_model(model, config.device)
    stop = tuple(config.stop)
    turn_end = end_of_turn(tokenizer)
    if turn_end is not None and turn_end not in stop:
        stop += (turn_end,)
    prompts = build_prompts(
        records, tokenizer, config.num_fewshot, fewshot_records, seed=config.fewshot_seed
    )
    started = time.perf_counter()
    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        stop=stop,
        progress=progress,
    )
    seconds = time.perf_counter() - started

    predictions = []
    for record, prompt, output in zip(records, prompts, outputs):
        gold = gold_answer(_split_reference(record)[1])
        strict, flexible = extract_strict(output), extract_flexible(output)
        predictions.append({
            **record.metadata,  # the fields below win over metadata keys of the same name
            "sample_id": record.sample_id,
            "prompt": prompt,
            "output": output,
            "extracted_strict": strict,
            "extracted_flexible": flexible,
            "gold": gold,
            "correct_strict": is_correct(strict, gold),
            "correct_flexible": is_correct(flexible, gold),
        })

    strict_mean, strict_err = _mean_and_stderr([p["correct_strict"] for p in predictions])
    flexible_mean, flexible_err = _mean_and_stderr([p["correct_flexible"] for p in predictions])
    n = len(predictions)
    metrics = {
        "n": n,
        "exact_match_strict": strict_mean,
        "exact_match_strict_stderr": strict_err,
        "exact_match_flexible": flexible_mean,
        "exact_match_flexible_stderr": flexible_err,
        "invalid_strict": sum(p["extracted_strict"] is None for p in predictions) / n,
        "invalid_flexible": sum(p["extracted_flexible"] is None for p in predictions) / n,
        "num_fewshot": config.num_fewshot,
        "max_new_tokens": config.max_new_tokens,
        "seconds": seconds,
        "samples_per_second": n / seconds if seconds > 0 else None,
    }
    return metrics, predictions


def write_eval_outputs(out_dir, metrics: dict, predictions: list[dict]) -> None:
    """Write `predictions.jsonl` and `metrics.json` into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "predictions.jsonl", predictions)
    write_json(out_dir / "metrics.json", metrics)


def lm_eval_model(model, tokenizer, batch_size: int | str = 16, **kwargs):
    """Wrap a loaded model for lm-evaluation-harness (`lm_eval.simple_evaluate(model=...)`).

    Extra keyword arguments go to `HFLM` (e.g. `max_length`). Needs `pip install qtune[eval]`.
    """
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise QTuneError("lm-evaluation-harness is not installed: pip install 'qtune[eval]'") from exc
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
