"""The selector contract: what a pruning method is, what it decides, and the registry.

A method sees the micro-batches of one optimizer step (under several processes and
`triage_scope="global"`, those of every process, gathered in rank order), and, when it asks for
them, their `BatchScores` from a no-grad pass with the current weights. It returns a `Decision`:
per micro-batch the rows to train on, the label mask (True = the token keeps its loss) and
optional loss weights; the nominal budget; statistics for the step log. The same method can be
applied once over a whole dataset (`select_dataset`, static selection).

Rules a method follows:
- it is deterministic given its inputs, the step and its state: under global scope every process
  runs it on the same gathered inputs and must reach the same decision;
- it reads only its own options (`config_class`, built by `build_method` from the run's config);
- its state (`state_dict`) is JSON-serialisable; the trainer saves it in each checkpoint and
  restores it on `--resume`.

A method may decide once, before the first step, from a pass over the whole training set with
the initial weights (`pass_needs`: Token Cleaning's global threshold). The trainer then scores
every training micro-batch once, hands each to `pass_values`, and `fix_masks` turns what they gave
into fixed label masks (`TokenMasks`), which the trainer saves in the run's folder and gives back
through `use_masks` (on --resume, read from that file instead); the steps apply them with no
scoring pass of their own.

Controls (`Method.control`) are registered like methods but serve experiments: they bound or
calibrate what a method is compared with. A control that reads the ground truth of the training
records (`needs_metadata`, e.g. `oracle`) gets every record's `metadata` once from the training
setup (`bind_records`), before the first step; real data has no such labels.

Add a method with `@register("name")` on a subclass of `Method`. The per-batch baselines are
built instead from two small registries, sample rules and token rules (`qtune.methods.rules`);
`qtune.methods.build.build_method` builds either kind by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import METHOD_NAMES, FullConfig
from ..errors import QTuneError
from ..scoring import BatchScores, DatasetScores, response_positions

#: The scores a method may ask the step for (`Method.needs`): the current model's token NLL and
#: entropy, a reference model's token NLL (`--reference-model`), the attention each position
#: receives in the last layer (`qtune.attention`), and each sample's logits matrix summarised: its
#: nuclear norm and its sketch (`qtune.logit_matrix`).
SCORES = frozenset({"nll", "entropy", "reference_nll", "attention", "nuclear_norm", "logit_sketch"})


@dataclass
class Selection:
    """What one micro-batch keeps.

    rows: int64 [k], the kept rows.
    label_mask: bool [B, L], True where a label keeps its loss (read on the kept rows only).
    weights: optional loss weights, float [B] (one per sample) or [B, L] (one per token); the
        loss is sum(weight x token cross-entropy) / kept tokens of the step. None means 1.
    """

    rows: torch.Tensor
    label_mask: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass
class Decision:
    """A method's decision for one optimizer step.

    nominal_budget: the share of response tokens the method means to train on (r_sample x
    r_token for Q-Tuning, 1 for full data); `measured_budget` is the share it did keep.
    stats: per-step statistics for the step log (JSON values).
    stage_seconds: seconds of the method's stages, for methods with a sample and a token stage
        ("triage", "token_select"; see `qtune.phases`).
    """

    selections: list[Selection]
    nominal_budget: float
    stats: dict = field(default_factory=dict)
    kept_tokens: int = 0
    response_tokens: int = 0
    stage_seconds: dict = field(default_factory=dict)

    @classmethod
    def over(cls, batches: list[dict], selections: list[Selection], nominal_budget: float,
             stats: dict, stage_seconds: dict | None = None) -> Decision:
        """The decision, with its kept and response token counts taken from `batches`."""
        kept = sum(int(s.label_mask[s.rows].sum()) for s in selections)
        response = sum(int(response_mask_of(b).sum()) for b in batches)
        return cls(selections, nominal_budget, stats, kept, response, stage_seconds or {})

    @property
    def measured_budget(self) -> float:
        return self.kept_tokens / max(self.response_tokens, 1)


@dataclass
class DatasetSelection:
    """A static selection over a dataset: the kept `sample_ids` (ascending) and, for each, the mask
    of its response tokens that keep their loss (in response order, as in `DatasetScores`)."""

    sample_ids: list[int]
    token_masks: dict[int, list[bool]]


@dataclass
class TokenMasks:
    """Label masks fixed once for the whole run, one per training sample (a method with
    `pass_needs`): the response tokens of sample `sample_id[i]`, in response order, keep their loss
    where keep[offsets[i]:offsets[i + 1]] is True.

    sample_id: int64 [N], ascending. offsets: int64 [N + 1]. keep: bool [T], T the response
    tokens of the training set. What they hold for the run: 1 byte per response token plus 16
    bytes per sample. info: how they were decided (strings: the log, the saved file's metadata).
    """

    sample_id: torch.Tensor
    offsets: torch.Tensor
    keep: torch.Tensor
    info: dict[str, str] = field(default_factory=dict)

    def label_mask(self, batch: dict) -> torch.Tensor:
        """bool [B, L], on the batch's device: each row's stored mask on its response positions.
        QTuneError for a row whose sample the pass did not see, or saw with another number of
        response tokens (the data or its tokenization changed since the masks were fixed)."""
        response = response_mask_of(batch).cpu()
        ids = batch["sample_id"].cpu()
        where = torch.searchsorted(self.sample_id, ids).clamp(max=self.sample_id.numel() - 1)
        mask = torch.zeros_like(response)
        for row, (sample, i) in enumerate(zip(ids.tolist(), where.tolist())):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            count = int(response[row].sum())
            if int(self.sample_id[i]) != sample or end - start != count:
                raise QTuneError(f"sample {sample} ({count} response tokens) is not among the token masks fixed before "
                                 "training; the training data or its tokenization changed since: start a new run")
            mask[row, response[row]] = self.keep[start:end]
        return mask.to(batch["labels"].device)


def response_mask_of(batch: dict) -> torch.Tensor:
    """Positions that receive loss in the unpruned batch (`qtune.scoring.response_positions`)."""
    return response_positions(batch["labels"])


def split_rows(flags: torch.Tensor, batches: list[dict]) -> list[torch.Tensor]:
    """A per-sample tensor over the whole step, split back into its micro-batches."""
    return list(torch.split(flags, [b["labels"].shape[0] for b in batches]))


class Method:
    """Base class of the pruning methods. Subclasses set `config_class`, `needs` and `select`."""

    name = "base"
    #: The dataclass of this method's options; `build_method` fills it from the run's config.
    config_class: type = FullConfig
    #: The scores the step must compute before `select` (a subset of `SCORES`); empty: none.
    needs: frozenset[str] = frozenset()
    #: The scores of a one-time pass over the training set with the initial weights, before the
    #: first step (a subset of `SCORES`); empty: no such pass (see the module doc).
    pass_needs: frozenset[str] = frozenset()
    #: A control of an experiment, not a pruning method: `qtune methods` marks it, and `qtune bench`
    #: runs it only when named.
    control: bool = False
    #: Whether `select` reads the training records' `metadata`: the training setup then calls
    #: `bind_records` once, before the first step.
    needs_metadata: bool = False

    def __init__(self, config):
        self.config = config

    def bind_records(self, metadata: dict[int, dict]) -> None:
        """Take the `metadata` of every training record, keyed by the record's sample_id (that of a
        batch's sample is `qtune.data.record_id_of(sample_id)`). Called when `needs_metadata`."""

    @property
    def nominal_budget(self) -> float:
        return 1.0

    @property
    def entropy_over(self) -> str:
        """Positions the scoring pass averages entropy over: "response" or "attended"."""
        return "response"

    def needs_scores_at(self, step: int, total_steps: int) -> bool:
        """Whether the step runs the scoring pass before `select` at this step."""
        return bool(self.needs)

    def pass_values(self, batch: dict, scores: BatchScores) -> dict[int, torch.Tensor]:
        """What the method keeps of one micro-batch of the pass: per sample_id, float32 values of
        its response tokens (response order, on the CPU)."""
        raise NotImplementedError(f"method {self.name!r} has no pass over the training set")

    def fix_masks(self, values: dict[int, torch.Tensor]) -> TokenMasks:
        """The label masks of the whole run, from `pass_values` of every training sample."""
        raise NotImplementedError(f"method {self.name!r} has no pass over the training set")

    def use_masks(self, masks: TokenMasks) -> None:
        """Apply `masks` (from `fix_masks`, or read back on --resume) from the next step on."""
        raise NotImplementedError(f"method {self.name!r} has no pass over the training set")

    def select(self, batches: list[dict], scores: list[BatchScores] | None, step: int) -> Decision:
        """The dynamic decision for one step (`scores` is None when no scoring pass ran)."""
        raise NotImplementedError

    def select_dataset(self, scores: DatasetScores) -> DatasetSelection:
        """The static decision over a whole dataset, from its scores."""
        raise NotImplementedError(f"method {self.name!r} has no static selection")

    def state_dict(self) -> dict:
        """State carried from step to step (JSON-serialisable); saved with each checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` on --resume."""


METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        unknown = (set(cls.needs) | set(cls.pass_needs)) - SCORES
        if unknown:
            raise ValueError(f"pruning method {name!r} needs unknown scores {sorted(unknown)}; known: {sorted(SCORES)}")
        cls.name = name
        METHODS[name] = cls
        METHOD_NAMES.add(name)
        return cls

    return add
