"""Per-batch baselines as two small registries: sample rules (which samples of the step keep their
loss) and token rules (which response tokens of the kept samples keep theirs). Any sample rule
combines with any token rule by name: the method "SAMPLE+TOKEN" (`longest+perplexity`,
`entropy+random`, `infobatch+all`) is one `ComposedMethod`, built by `build_method`.

A sample rule sees the whole step (its micro-batches in order, and their scores when it needs
them) and returns the kept samples (bool [N], N the step's samples, micro-batches in order),
optional per-sample loss weights and statistics; the rules that keep a fixed share keep exactly
`keep_count(r_sample, N)` samples. A token rule sees one micro-batch (and its scores) and returns
its label mask (bool [B, L], True where a response token keeps its loss), read on the kept rows
only; the rules that keep a share keep `keep_count(r_token, n)` tokens of a row of n response
tokens. Every rule states its tie rule.

A token rule may instead decide once, before the first step, over the response tokens of the
whole training set (`TokenRule.pass_needs`, e.g. `token_cleaning`'s global threshold): it turns the
scores of a pass with the initial weights into one value per token (`pass_values`), then fixes
every sample's mask from all of them (`fix_masks`); the steps apply the stored masks
(`qtune.methods.base.TokenMasks`) and call no `masks`.

Random draws come from one generator per step, seeded by (seed, step) (`step_generator`): the
sample rule draws first, then the token rule, micro-batch by micro-batch, so `random+random`
decides exactly as the `random` method. A sample rule may keep state across steps (`new_state`,
e.g. UDS's memory buffer): the composed method holds it, hands it to `choose` as `view.state`,
and saves it with the checkpoints (`state_dict`); token rules keep none.

Each rule file registers its rules with `register_sample_rule` / `register_token_rule` and names
its options' dataclass (`config_class`, in `qtune.config`); a composed method's options are those
of its two rules plus r_sample, r_token and seed (`RandomConfig`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..config import SAMPLE_RULE_NAMES, TOKEN_RULE_NAMES, RandomConfig, composed_parts, method_choices
from ..errors import QTuneError
from ..phases import PhaseClock
from ..scoring import BatchScores
from .base import SCORES, Decision, Method, Selection, TokenMasks, response_mask_of, split_rows
from .random import step_generator


@dataclass
class StepView:
    """What a sample rule sees of one step.

    batches: the step's micro-batches, in order; scores: their `BatchScores`, or None when no
    scoring pass ran; step: the optimizer step (0-based); total_steps: the run's optimizer steps,
    None when unknown (the method was not told; see `ComposedMethod.needs_scores_at`);
    generator: the step's draws (shared with the token rule, which draws after); bound: for a rule
    with `needs_metadata`, what its `bind` made of the training records' metadata (None otherwise);
    state: the rule's state across steps (`SampleRule.new_state`; None for a rule without any),
    which `choose` may update.
    """

    batches: list[dict]
    scores: list[BatchScores] | None
    step: int
    total_steps: int | None
    generator: torch.Generator
    bound: object = None  # what a rule that reads the records' metadata made of it (`SampleRule.bind`)
    state: object = None

    @property
    def n(self) -> int:
        return sum(b["labels"].shape[0] for b in self.batches)

    def response_lengths(self) -> torch.Tensor:
        """int64 [N]: each sample's response tokens (no scores needed)."""
        return torch.cat([response_mask_of(b).sum(1).cpu() for b in self.batches])

    def sample_scores(self, name: str) -> torch.Tensor:
        """float [N] (or [N, k] for a vector per sample) on the CPU: the per-sample score `name`
        ("ppl", "ent", "nuclear_norm", "logit_sketch") of every sample, or the mean token NLL
        ("loss", = log ppl, taken from the token NLLs)."""
        if self.scores is None:
            raise QTuneError("this sample rule needs the scoring pass, which did not run at this step")
        if name == "loss":
            return torch.cat([(s.nll * s.response_mask).sum(1).cpu() / s.n_response.clamp_min(1).cpu()
                              for s in self.scores])
        return torch.cat([getattr(s, name).float().cpu() for s in self.scores])


@dataclass
class SampleChoice:
    """A sample rule's decision: kept (bool [N]), optional loss weights (float [N], one per
    sample; None means 1) and statistics for the step log."""

    kept: torch.Tensor
    weights: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


class SampleRule:
    """Base of the sample rules. Subclasses set `config_class` (None: no options of their own),
    `needs` and `choose`; the first line of the docstring is the rule's summary in `qtune methods`."""

    name = "base"
    config_class: type | None = None
    needs: frozenset[str] = frozenset()
    #: Whether the rule reads the training records' metadata (`bind`); such a rule is a control
    #: of experiments (labelled data, e.g. `oracle_ratio`), and so is every method built on it.
    needs_metadata: bool = False

    def share(self, cfg) -> float:
        """The share of the step's samples the rule means to keep (nominal budget)."""
        return cfg.r_sample

    def bind(self, metadata: dict[int, dict], method: str) -> object:
        """What the rule keeps of every training record's metadata (keyed by the record's
        sample_id), checked once before the first step; `choose` reads it as `view.bound`."""
        raise NotImplementedError

    def needs_scores_at(self, cfg, step: int, total_steps: int) -> bool:
        return bool(self.needs)

    def new_state(self, cfg) -> RuleState | None:
        """The state the rule keeps across steps, fresh (None: it keeps none)."""
        return None

    def choose(self, cfg, view: StepView) -> SampleChoice:
        raise NotImplementedError


class RuleState:
    """A sample rule's state across steps: JSON-serialisable through `state_dict`, restored by
    `load_state_dict` on --resume. Under global triage every process updates it from the same
    gathered batch, so it is the same on every process."""

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class TokenRule:
    """Base of the token rules. Subclasses set `config_class`, `needs` and `masks`, or, for a rule
    that decides once before training, `pass_needs`, `pass_values` and `fix_masks`."""

    name = "base"
    config_class: type | None = None
    needs: frozenset[str] = frozenset()
    #: The scores of the one-time pass over the training set (a subset of SCORES); empty: none.
    pass_needs: frozenset[str] = frozenset()

    def share(self, cfg) -> float:
        """The share of a kept sample's response tokens the rule means to keep (nominal budget)."""
        return cfg.r_token

    def masks(self, cfg, batch: dict, scores: BatchScores | None, generator: torch.Generator) -> torch.Tensor:
        """bool [B, L]: True where a response token of the micro-batch keeps its loss (every row;
        only the kept rows are read)."""
        raise NotImplementedError

    def pass_values(self, cfg, scores: BatchScores) -> list[torch.Tensor]:
        """Per row of a micro-batch of the pass, float32 values of its response tokens (response
        order, on the CPU)."""
        raise NotImplementedError

    def fix_masks(self, cfg, values: dict[int, torch.Tensor]) -> TokenMasks:
        """The masks of every training sample from the values of all of them (keyed by sample_id)."""
        raise NotImplementedError


SAMPLE_RULES: dict[str, SampleRule] = {}
TOKEN_RULES: dict[str, TokenRule] = {}


def _register(kind: str, registry: dict, names: set[str], name: str):
    def add(cls):
        if "+" in name or name in registry:
            raise ValueError(f"{kind} rule {name!r} is already registered or holds a '+'")
        unknown = (set(cls.needs) | set(getattr(cls, "pass_needs", ()))) - SCORES
        if unknown:
            raise ValueError(f"{kind} rule {name!r} needs unknown scores {sorted(unknown)}; known: {sorted(SCORES)}")
        cls.name = name
        registry[name] = cls()
        names.add(name)
        return cls

    return add


def register_sample_rule(name: str):
    """Class decorator: register a `SampleRule` subclass under `name`."""
    return _register("sample", SAMPLE_RULES, SAMPLE_RULE_NAMES, name)


def register_token_rule(name: str):
    """Class decorator: register a `TokenRule` subclass under `name`."""
    return _register("token", TOKEN_RULES, TOKEN_RULE_NAMES, name)


def top_samples(values: torch.Tensor, count: int, *, highest: bool) -> torch.Tensor:
    """bool [N]: the `count` samples with the highest (or lowest) `values`; ties go to the lower
    index (the earlier sample of the step)."""
    order = torch.sort(values, descending=highest, stable=True).indices
    kept = torch.zeros(values.numel(), dtype=torch.bool)
    kept[order[:count]] = True
    return kept


def middle_samples(values: torch.Tensor, count: int) -> torch.Tensor:
    """bool [N]: the `count` samples in the middle of the ascending order of `values`, positions
    floor((N - count) / 2) to floor((N - count) / 2) + count - 1 (ties: the lower index first)."""
    order = torch.sort(values, stable=True).indices
    start = (values.numel() - count) // 2
    kept = torch.zeros(values.numel(), dtype=torch.bool)
    kept[order[start:start + count]] = True
    return kept


# --- the composed method ------------------------------------------------------------------------


class ComposedMethod(Method):
    """A sample rule and a token rule combined: "SAMPLE+TOKEN" (see `qtune.methods.rules`)."""

    sample_rule: SampleRule
    token_rule: TokenRule

    def __init__(self, config):
        super().__init__(config)
        # The step calls needs_scores_at(step, total_steps) before select: the run's length is
        # learnt there, for the rules that depend on it (InfoBatch's annealing).
        self.total_steps: int | None = None
        # The token rule's fixed masks, when it decides before training (`use_masks`).
        self.token_masks: TokenMasks | None = None
        # What the sample rule made of the training records' metadata (`bind_records`).
        self.bound: object = None
        # What the sample rule carries from step to step (`SampleRule.new_state`).
        self.rule_state = self.sample_rule.new_state(config)

    def bind_records(self, metadata):
        self.bound = self.sample_rule.bind(metadata, self.name)

    @property
    def nominal_budget(self) -> float:
        return self.sample_rule.share(self.config) * self.token_rule.share(self.config)

    def needs_scores_at(self, step, total_steps):
        self.total_steps = total_steps
        return self.sample_rule.needs_scores_at(self.config, step, total_steps) or bool(self.token_rule.needs)

    def select(self, batches, scores, step):
        cfg = self.config
        if self.needs_metadata and self.bound is None:
            raise QTuneError(f"{self.name} reads the training records' metadata: call bind_records with it before the "
                             "first step")
        generator = step_generator(cfg.seed, step)
        clock = PhaseClock(batches[0]["input_ids"].device)
        with clock.phase("triage"):
            choice = self.sample_rule.choose(cfg, StepView(batches, scores, step, self.total_steps, generator,
                                                           self.bound, self.rule_state))
        weights = [None] * len(batches) if choice.weights is None else split_rows(choice.weights, batches)
        selections = []
        with clock.phase("token_select"):
            for j, (batch, kept) in enumerate(zip(batches, split_rows(choice.kept, batches))):
                if self.token_rule.pass_needs:
                    mask = self._fixed_masks().label_mask(batch)
                else:
                    mask = self.token_rule.masks(cfg, batch, None if scores is None else scores[j], generator)
                selections.append(Selection(kept.nonzero().flatten(), mask, weights[j]))
        stats = {"samples": choice.kept.numel(), "kept": int(choice.kept.sum()), **choice.stats}
        return Decision.over(batches, selections, self.nominal_budget, stats, clock.seconds)

    def state_dict(self):
        return {} if self.rule_state is None else {"sample_rule": self.rule_state.state_dict()}

    def load_state_dict(self, state):
        if self.rule_state is not None and "sample_rule" in state:
            self.rule_state.load_state_dict(state["sample_rule"])

    def pass_values(self, batch, scores):
        values = self.token_rule.pass_values(self.config, scores)
        return dict(zip(batch["sample_id"].tolist(), values))

    def fix_masks(self, values):
        return self.token_rule.fix_masks(self.config, values)

    def use_masks(self, masks):
        self.token_masks = masks

    def _fixed_masks(self) -> TokenMasks:
        if self.token_masks is None:
            raise QTuneError(f"method {self.name!r}: the {self.token_rule.name} token rule decides once, over the "
                             "whole training set, before the first step; this training loop did not run that pass "
                             "(qtune train and QTuneSFTTrainer do: QTuneTrainer.train)")
        return self.token_masks


_CLASSES: dict[str, type[ComposedMethod]] = {}


def composed_class(name: str) -> type[ComposedMethod]:
    """The method class of "SAMPLE+TOKEN": its options' dataclass holds those of both rules plus
    r_sample, r_token and seed; it needs the scores either rule needs. One class per name."""
    parts = composed_parts(name)
    if parts is None:
        raise QTuneError(f"unknown method {name!r}; available: {method_choices()}")
    if name not in _CLASSES:
        sample, token = SAMPLE_RULES[parts[0]], TOKEN_RULES[parts[1]]
        bases = tuple(dict.fromkeys(c for c in (sample.config_class, token.config_class) if c is not None))
        config_class = dataclasses.make_dataclass(
            f"{_title(name)}Config", [], bases=(*bases, RandomConfig),
            namespace={"__doc__": f"Options of `{name}`: those of its rules, r_sample, r_token and seed."})
        _CLASSES[name] = type(f"{_title(name)}Method", (ComposedMethod,), {
            "__doc__": f"{_summary(sample)}; {_summary(token)}", "name": name, "config_class": config_class, "needs": sample.needs | token.needs,
            "pass_needs": token.pass_needs, "sample_rule": sample, "token_rule": token,
            "needs_metadata": sample.needs_metadata, "control": sample.needs_metadata})
    return _CLASSES[name]


def _summary(rule) -> str:
    """The first line of a rule's docstring (its summary in `qtune methods`)."""
    return (rule.__doc__ or "").strip().splitlines()[0]


def _title(name: str) -> str:
    return "".join(part.title() for part in name.replace("+", "_").split("_"))


# --- the token rule that keeps everything -------------------------------------------------------


@register_token_rule("all")
class AllTokens(TokenRule):
    """every response token of a kept sample keeps its loss (sample pruning only)"""

    def share(self, cfg) -> float:
        return 1.0

    def masks(self, cfg, batch, scores, generator):
        return response_mask_of(batch)

