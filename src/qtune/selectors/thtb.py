"""The `thtb` selector: THTB's three stages in sequence, each keeping a share of what the one
before kept, then keep_count(ratio, N) samples of highest extrinsic hardness among what is left.

Citation: "The Harder The Better: Maintaining Supervised Fine-tuning Generalization with Less but
Harder Data" (THTB), arXiv 2510.13892. Reimplemented from the method as described in the
authors' README (github.com/DYJG-research/THTB, which restates the paper's method section with its
formulas) and the paper's abstract; no code was copied. The body of the arXiv paper itself could
not be read here. What is confirmed there, and what is *assumed*:

1. Quality (confirmed: a reward model's score of each (query, response) pair, the top 20% kept).
   Here the score is a number you already have in each record's `metadata[--judge-field]` (the
   hardness selector's option), and the `--judge-keep` share (0.2) of highest scores passes. No
   reward model runs here; without `--judge-field` the stage is skipped and the stats say so
   (*assumed*: the README does not consider running without it).
2. Intrinsic hardness IHS (confirmed: IHS = the mean of the Bloom score and the interdisciplinary
   complexity IC; the top 50% of the quality subset kept). A local LLM judge (`--judge-model`,
   `qtune.judge`) answers, for each instruction that passed stage 1, its Bloom level (1 remember ..
   6 create) and the disciplines it draws on. Bloom = the level min-max normalised over the
   judged samples (confirmed: the README's Bloom score is sum_i i x delta_i, min-max normalised
   over the dataset; it lets a sample belong to several levels, here it has exactly one);
   IC = the number of distinct disciplines min-max normalised over the judged samples (confirmed:
   the first term of the README's IC). Not reproduced: IC's second term, the mean pairwise cosine
   distance between embeddings (bge-large-en-v1.5) of generated descriptions of the disciplines,
   which needs a second model and a description per discipline. The `--intrinsic-keep` share
   (0.5) of highest IHS passes.
3. Extrinsic hardness EHS (confirmed: the mean of the instruction-response expansion index and the
   silhouette of TF-IDF k-means clusters, computed on the subset that passed stage 2, the top 50%
   kept): qtune's `hardness` selector (`SELECTORS["hardness"]`) run on that subset alone, its
   `score`. The keep_count(ratio, N) samples of highest EHS are kept: `--ratio` is the share of the
   whole dataset, as for every selector (THTB's 20% x 50% x 50% is --ratio 0.05). When more are
   asked for than pass stage 2 the selector stops with an error saying which options allow it.

The judge (`qtune.judge`): one prompt per instruction asking both questions (wording this
module's own; THTB's released prompts ask separately, the Bloom one with the response too, and
score 1-21 within levels: *deviation*, one generation per record, the instruction alone), greedy
by default, answers cached. An answer that cannot be read (no level 1..6, or no list of 1..10
disciplines) counts in the stats (`judge_unparsed`, per field) and gets the lowest value, level 1
or one discipline: an answer that says nothing is no evidence of hardness, and THTB keeps the
hardest, so a failed answer ranks as the easiest rather than as average (the median would let
judge failures pass as middling-hard samples). With every answer unreadable (a judge too weak for
the prompt) every IHS is 0 and stage 2 keeps the earliest samples: the stats show it.

`--judge-check-temperature T` judges every record a second time, sampled at T with seed
`--judge-seed` + 1, and reports the two passes' agreement (`qtune.judge.judge_agreement`: exact
and within one, for the level and the discipline count) in the stats; the choice uses the first
pass only.

The score written to scores.parquet is for inspection: the stage a sample reached (0 dropped by
quality, 1 dropped by intrinsic hardness, 2 ranked by extrinsic hardness) plus its value at that
stage min-max normalised over the samples ranked there (quality score, IHS, EHS), so the kept
samples have the highest. Ties at every stage: the earlier sample first.

Cost: stage 1 O(N log N); stage 2 one generation of at most `--judge-max-new-tokens` tokens per
instruction that passed stage 1 (cached: a rerun with the same judge, prompt version and
settings generates nothing; the judge model is not even loaded), twice with the check; stage 3
the hardness selector's cost on the stage-2 subset.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import torch

from ..console import log
from ..errors import QTuneError
from ..pruning import keep_count, min_max
from . import hardness
from .base import SELECTORS, SelectorInputs, StaticChoice, keep_top, register_selector


def normalised(values: list[float]) -> list[float]:
    """`qtune.pruning.min_max` of a list: each value's position between the smallest (0) and the
    largest (1), all 0 when they are equal; [] for []."""
    return min_max(torch.tensor(values, dtype=torch.float64)).tolist() if values else []


def intrinsic_hardness(levels: list[int], disciplines: list[int]) -> list[float]:
    """IHS per sample: the mean of its min-max normalised Bloom level and min-max normalised number
    of disciplines (both over the given samples)."""
    bloom, breadth = normalised([float(v) for v in levels]), normalised([float(v) for v in disciplines])
    return [(b + c) / 2 for b, c in zip(bloom, breadth)]


@dataclasses.dataclass
class Stages:
    """kept: positions kept (ascending); score: the inspection score of every position (see the
    module doc); passed_quality, passed_intrinsic: the positions that passed stages 1 and 2."""

    kept: list[int]
    score: list[float]
    passed_quality: list[int]
    passed_intrinsic: list[int]


def thtb_stages(n: int, count: int, *, quality: list[float] | None, quality_keep: float,
                intrinsic: Callable[[list[int]], list[float]], intrinsic_keep: float,
                extrinsic: Callable[[list[int]], list[float]]) -> Stages:
    """THTB's three stages over positions 0..n-1, keeping `count` in the end: the `quality_keep`
    share of highest `quality` (all pass when it is None), the `intrinsic_keep` share of those of
    highest `intrinsic(passed)` (one value per passed position, in order), then the `count` of
    highest `extrinsic(passed)` among those. Ties: the earlier position. QTuneError, before any
    scoring, when `count` is more than stage 2 lets through."""
    passed_quality = list(range(n)) if quality is None else keep_top(quality, keep_count(quality_keep, n), highest=True)
    through = keep_count(intrinsic_keep, len(passed_quality))
    if count > through:
        shares = (("" if quality is None else f"--judge-keep {quality_keep:g} x ")
                  + f"--intrinsic-keep {intrinsic_keep:g}")
        raise QTuneError(f"--ratio keeps {count} of {n} samples, but only {through} pass THTB's first two stages "
                         f"({shares}); give --ratio {through / n:.4g} or less, or raise those shares (THTB's own: "
                         f"20% x 50%, then --ratio 0.05)")
    ihs = intrinsic(passed_quality)
    passed_intrinsic = [passed_quality[j] for j in keep_top(ihs, through, highest=True)]
    ehs = extrinsic(passed_intrinsic)
    kept = sorted(passed_intrinsic[j] for j in keep_top(ehs, count, highest=True))
    score = [0.0] * n if quality is None else normalised(quality)
    for i, value in zip(passed_quality, normalised(ihs)):
        score[i] = 1 + value
    for i, value in zip(passed_intrinsic, normalised(ehs)):
        score[i] = 2 + value
    return Stages(kept, score, passed_quality, passed_intrinsic)


def subset_inputs(inputs: SelectorInputs, positions: list[int]) -> SelectorInputs:
    """The selector inputs of the samples at `positions` alone (the scores' per-sample lists too)."""
    scores, n = inputs.scores, len(inputs.scores.sample_id)

    def take(values):
        return None if values is None else [values[i] for i in positions]

    if dataclasses.is_dataclass(scores):
        per_sample = {f.name: take(getattr(scores, f.name)) for f in dataclasses.fields(scores)
                      if isinstance(getattr(scores, f.name), list) and len(getattr(scores, f.name)) == n}
        scores = dataclasses.replace(scores, **per_sample)
    return SelectorInputs(scores, texts=take(inputs.texts), pairs=take(inputs.pairs), metadata=take(inputs.metadata),
                          processes=inputs.processes)


def _judge(cfg, inputs, instructions: list[str], temperature: float, seed: int):
    from ..judge import JudgeSettings, judge_instructions, parse_judge_answer

    run = judge_instructions(instructions, model=cfg.judge_model,
                             settings=JudgeSettings(cfg.judge_max_new_tokens, temperature, seed),
                             batch_size=cfg.batch_size, device=str(inputs.processes.device),
                             dtype=getattr(cfg, "dtype", "auto"),
                             trust_remote_code=getattr(cfg, "trust_remote_code", False),
                             progress=inputs.processes.is_main)
    return run, [parse_judge_answer(a) for a in run.answers]


def _histogram(values) -> dict[str, int]:
    counts = Counter(v for v in values if v is not None)
    return {str(k): counts[k] for k in sorted(counts)}


@register_selector("thtb")
class ThtbSelector:
    """THTB: a quality score, then intrinsic hardness (a local judge), then extrinsic hardness, each keeping a share"""

    needs = frozenset({"texts"}) | hardness.HardnessSelector.needs

    def choose(self, cfg, inputs) -> StaticChoice:
        n, ids = len(inputs.texts), inputs.scores.sample_id
        instructions = [instruction for instruction, _ in inputs.pairs]
        quality = hardness.quality_values(inputs.metadata, cfg.judge_field, ids) if cfg.judge_field else None
        stats: dict = {"quality_stage": (f"metadata[{cfg.judge_field!r}], highest {cfg.judge_keep:g} kept"
                                         if quality is not None else "none: no --judge-field, every sample passes")}
        if quality is None:
            log("thtb: no --judge-field, so no quality filter runs (THTB's first stage keeps the 20% of highest "
                "reward-model scores)")

        def intrinsic(positions: list[int]) -> list[float]:
            texts = [instructions[i] for i in positions]
            run, answers = _judge(cfg, inputs, texts, cfg.judge_temperature, cfg.judge_seed)
            levels = [a.level for a in answers]
            counts = [a.disciplines for a in answers]
            stats.update(judge_model=cfg.judge_model, judged=len(answers), judge_cached=run.cached,
                         judge_generated=run.generated, judge_seconds=round(run.seconds, 3), judge_cache=run.cache,
                         judge_unparsed=sum(not a.parsed for a in answers),
                         judge_unparsed_level=levels.count(None), judge_unparsed_disciplines=counts.count(None),
                         bloom_levels=_histogram(levels), discipline_counts=_histogram(counts))
            if stats["judge_unparsed"]:
                log(f"thtb: {stats['judge_unparsed']} of {len(answers)} judge answers could not be read in full; "
                    "the unreadable fields count as the lowest (level 1, one discipline)")
            if cfg.judge_check_temperature is not None:
                check, again = _judge(cfg, inputs, texts, cfg.judge_check_temperature, cfg.judge_seed + 1)
                from ..judge import judge_agreement

                stats["judge_check"] = {
                    "temperature": cfg.judge_check_temperature, "seed": cfg.judge_seed + 1,
                    "generated": check.generated, "seconds": round(check.seconds, 3),
                    "level": judge_agreement(levels, [a.level for a in again]),
                    "disciplines": judge_agreement(counts, [a.disciplines for a in again])}
            return intrinsic_hardness([v or 1 for v in levels], [v or 1 for v in counts])

        def extrinsic(positions: list[int]) -> list[float]:
            choice = SELECTORS["hardness"]().choose(dataclasses.replace(cfg, judge_field=None),
                                                     subset_inputs(inputs, positions))
            stats["extrinsic"] = choice.stats
            return [float(v) for v in choice.score]

        stages = thtb_stages(n, keep_count(cfg.ratio, n), quality=quality, quality_keep=cfg.judge_keep,
                             intrinsic=intrinsic, intrinsic_keep=cfg.intrinsic_keep, extrinsic=extrinsic)
        stats.update(passed_quality=len(stages.passed_quality), passed_intrinsic=len(stages.passed_intrinsic))
        log(f"thtb: {len(stages.passed_quality)} of {n} samples pass the quality stage, "
            f"{len(stages.passed_intrinsic)} the intrinsic one, {len(stages.kept)} are kept by extrinsic hardness")
        return StaticChoice([ids[i] for i in stages.kept], stages.score,
                            "quality, then highest intrinsic, then highest extrinsic hardness (THTB)", stats)
