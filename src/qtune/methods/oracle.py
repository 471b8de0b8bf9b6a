"""Ground-truth controls: `oracle`, `oracle_ratio` and `anti_oracle` choose whole samples by the
`defective` flag in each training record's `metadata` (true when the response is wrong). Real
data has no such flag; the qtune testbed's records carry it (`qtune testbed build --preset
saturated`). They bound what choosing samples can gain: `oracle` drops exactly the defective
records; at Q-Tuning's sample budget `oracle_ratio` keeps the clean samples first (the ceiling)
and `anti_oracle` the defective ones first (the floor). Every kept sample keeps every response
token; no scores, no state.

`oracle_ratio` and `anti_oracle` are also sample rules, so that a token rule can prune inside
what they keep: `oracle_ratio+random` at r_sample x r_token is the ceiling at the same token
budget as `random` or `qtuning` there (`oracle_ratio+all` decides exactly as `oracle_ratio`)."""

from __future__ import annotations

import torch

from ..config import OracleConfig, SampleRatioConfig
from ..data import record_id_of
from ..errors import QTuneError
from ..pruning import keep_count
from .base import DatasetSelection, Decision, Method, Selection, register, response_mask_of, split_rows
from .random import step_generator
from .rules import SampleChoice, SampleRule, register_sample_rule


def defective_labels(metadata: dict[int, dict], method: str) -> dict[int, bool]:
    """record sample_id -> its `metadata["defective"]`. QTuneError naming `method` when a record
    has no boolean `defective` (unlabelled data)."""
    unlabelled = sorted(i for i, m in metadata.items() if not isinstance(m.get("defective"), bool))
    if unlabelled:
        raise QTuneError(f"{method} is a ground-truth control: it reads metadata.defective (true or false) of every "
                         f"training record, which {len(unlabelled)} of {len(metadata)} records lack (first: sample "
                         f"{unlabelled[0]}); controls need labelled data, such as the qtune testbed's "
                         "(qtune testbed build --preset saturated)")
    return {i: m["defective"] for i, m in metadata.items()}


def sample_labels(labels: dict[int, bool] | None, sample_ids: list[int], method: str) -> torch.Tensor:
    """bool [len(sample_ids)]: whether each sample's record is defective, from `defective_labels`."""
    if labels is None:
        raise QTuneError(f"{method} has no labels: call bind_records with the training records' metadata before "
                         "the first step")
    try:
        return torch.tensor([labels[record_id_of(i)] for i in sample_ids], dtype=torch.bool)
    except KeyError as exc:
        raise QTuneError(f"{method}: record {exc.args[0]} is not among the bound training records") from None


def step_labels(labels: dict[int, bool] | None, batches: list[dict], method: str) -> torch.Tensor:
    """bool [N]: whether each sample of the step (micro-batches in order) is defective."""
    return sample_labels(labels, torch.cat([b["sample_id"] for b in batches]).tolist(), method)


def ratio_choice(defective: torch.Tensor, r_sample: float, generator: torch.Generator, *,
                 defective_first: bool) -> torch.Tensor:
    """bool [N]: keep_count(r_sample, N) samples, the clean ones first (the defective ones with
    `defective_first`), in an order drawn from `generator` (`preferred_first`)."""
    preferred = defective if defective_first else ~defective
    return preferred_first(preferred, keep_count(r_sample, defective.numel()), generator)


def whole_samples(batches: list[dict], chosen: torch.Tensor, defective: torch.Tensor,
                  nominal_budget: float) -> Decision:
    """Every response token of the `chosen` samples and nothing of the others (`chosen` and
    `defective`: bool [N] over the step's samples, micro-batches in order)."""
    selections = [Selection(kept.nonzero().flatten(), response_mask_of(batch))
                  for batch, kept in zip(batches, split_rows(chosen, batches))]
    stats = {"samples": chosen.numel(), "kept": int(chosen.sum()), "defective": int(defective.sum()),
             "kept_defective": int((chosen & defective).sum())}
    return Decision.over(batches, selections, nominal_budget, stats)


def preferred_first(preferred: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """bool [N]: `count` samples, the `preferred` ones (bool [N]) first, in a uniformly random
    order drawn from `generator` (one `randperm(N)`): the others only when the preferred run out.
    With every sample preferred (or none) it is the draw of `random` at the same generator."""
    order = torch.randperm(preferred.numel(), generator=generator)
    order = order[torch.sort((~preferred[order]).to(torch.uint8), stable=True).indices]
    chosen = torch.zeros(preferred.numel(), dtype=torch.bool)
    chosen[order[:count]] = True
    return chosen


class LabelledControl(Method):
    """Base of the controls that read `metadata.defective` (`bind_records` keeps one flag per
    record)."""

    control = True
    needs_metadata = True

    def __init__(self, config):
        super().__init__(config)
        self._defective: dict[int, bool] | None = None

    def bind_records(self, metadata):
        self._defective = defective_labels(metadata, self.name)

    def defective(self, sample_ids: list[int]) -> torch.Tensor:
        """bool [len(sample_ids)]: whether each sample's record is defective."""
        return sample_labels(self._defective, sample_ids, self.name)

    def step_defective(self, batches: list[dict]) -> torch.Tensor:
        """bool [N]: whether each sample of the step (micro-batches in order) is defective."""
        return step_labels(self._defective, batches, self.name)


@register("oracle")
class Oracle(LabelledControl):
    """Control: every clean record whole, no defective one (reads metadata.defective)."""

    config_class = OracleConfig

    @property
    def nominal_budget(self) -> float:
        """The share of clean records among the bound ones (1 before `bind_records`)."""
        labels = self._defective or {}
        return 1.0 - sum(labels.values()) / len(labels) if labels else 1.0

    def select(self, batches, scores, step):
        defective = self.step_defective(batches)
        return whole_samples(batches, ~defective, defective, self.nominal_budget)

    def select_dataset(self, scores):
        clean = [(i, n) for i, n, bad in zip(scores.sample_id, scores.n_response, self.defective(scores.sample_id))
                 if not bad]
        return DatasetSelection([i for i, _ in clean], {i: [True] * n for i, n in clean})


@register("oracle_ratio")
class OracleRatio(LabelledControl):
    """Control: keep_count(r_sample, N) whole samples per step, clean ones first (reads metadata.defective)."""

    config_class = SampleRatioConfig
    #: Whether the defective samples come first (`anti_oracle`) rather than the clean ones.
    defective_first = False

    @property
    def nominal_budget(self) -> float:
        return self.config.r_sample

    def select(self, batches, scores, step):
        """The preferred samples in an order drawn from (seed, step), then the others."""
        defective = self.step_defective(batches)
        chosen = ratio_choice(defective, self.config.r_sample, step_generator(self.config.seed, step),
                              defective_first=self.defective_first)
        return whole_samples(batches, chosen, defective, self.nominal_budget)


@register("anti_oracle")
class AntiOracle(OracleRatio):
    """Control: keep_count(r_sample, N) whole samples per step, defective ones first (reads metadata.defective)."""

    defective_first = True


@register_sample_rule("oracle_ratio")
class CleanFirstRule(SampleRule):
    """ground-truth control: keep_count(r_sample, N) samples per step, clean ones first (reads metadata.defective)"""

    needs_metadata = True
    defective_first = False

    def bind(self, metadata, method):
        return defective_labels(metadata, method)

    def choose(self, cfg, view):
        defective = step_labels(view.bound, view.batches, self.name)
        chosen = ratio_choice(defective, cfg.r_sample, view.generator, defective_first=self.defective_first)
        return SampleChoice(chosen, stats={"defective": int(defective.sum()),
                                           "kept_defective": int((chosen & defective).sum())})


@register_sample_rule("anti_oracle")
class DefectiveFirstRule(CleanFirstRule):
    """ground-truth control: keep_count(r_sample, N) samples per step, defective ones first (reads metadata.defective)"""

    defective_first = True
