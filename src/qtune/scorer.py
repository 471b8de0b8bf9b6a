"""Where a step's scores come from, and how much they cost.

The paper scores every sample of every batch with the full model being trained. `Scorer` does
that by default and offers two cheaper sources (issue 13, "below the bound"), kept because they
lost no testbed accuracy beyond one standard deviation (docs/performance.md, which also has the
one that did: a frozen smaller model scoring in place of the trained one, since removed):

- `layers=N`: an early exit. The model being trained runs only its first N decoder layers, then
  its own final norm and output projection. Every weight is shared, so the scores follow
  training, and the body costs about N/L of a full scoring pass.
- `rescore_drift=d`: a sample's scores from its previous visit are reused while the weights have
  moved less than `d` since then. "Moved" is the path length of the updates, the sum of
  ||theta_{t+1} - theta_t|| over the optimizer steps since the visit, divided by ||theta|| now.
  The path is at least the distance, so the test is conservative. `DriftMeter` measures it
  around each optimizer step, at the cost of one copy of the trainable weights.

A `reference` model (Rho-1's, `--reference-model`) adds its token NLL to the scores
(`BatchScores.reference_nll`) for the methods that need it; it is frozen and never truncated.
Token Cleaning needs it only in its one pass over the training set before training
(`build_scorer(training_set_pass=True)`), then no more.
`attention=True` adds the attention each position receives in the last layer that runs
(`BatchScores.attention`, `qtune.attention`), from the same pass; `nuclear_norm=True` and
`logit_sketch` add each sample's logits matrix summarised (`BatchScores.nuclear_norm`,
`logit_sketch`, `qtune.logit_matrix`: UDS's scores), from the same pass too.

A reused sample keeps its token scores as well as its sample scores, so token pruning sees what
it saw then. Each process keeps its own cache: under several processes a sample's scores are
reused only when it comes back to the same process.
"""

from __future__ import annotations

import contextlib

import torch

from .attention import attention_probabilities, capture_last_layer, received_attention
from .errors import QTuneError
from .logit_matrix import LogitSketch, LogitSummaries
from .models import check_vocabulary, decoder_layers, load_model
from .scoring import TOKEN_FIELDS, BatchScores, score_batch


@contextlib.contextmanager
def first_layers(model, n: int):
    """Inside the block, `model` runs only its first `n` decoder layers, then its final norm and
    head (the weights are the model's own: nothing is copied). 0 leaves the model whole."""
    if n == 0:
        yield model
        return
    body, layers = decoder_layers(model, "score_layers")
    if n >= len(layers):
        raise QTuneError(f"score_layers={n} but the model has {len(layers)} decoder layers: pick fewer, or 0 "
                         "for every layer")
    body.layers = layers[:n]
    try:
        yield model
    finally:
        body.layers = layers


def _rows(batch: dict, rows: torch.Tensor) -> dict:
    return {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}


class Scorer:
    """The scores of each micro-batch of a step (see the module doc for the sources).

    chunk_tokens, head_impl: as `qtune.score_batch`. layers: decoder layers of the early exit (0:
    all). rescore_drift: reuse a visit's scores while the weights have moved less than this (0: never);
    needs a `DriftMeter` to report each optimizer step through `moved`. reference: a frozen model
    whose token NLL is added as `reference_nll` (None: not computed). attention: add the last
    layer's received attention as `attention`. nuclear_norm, logit_sketch: add each sample's
    logits matrix's nuclear norm and its sketch of that shape (None: not computed). lockstep: every
    micro-batch runs a forward pass, also when all its rows' scores are reused (under FSDP2 and
    ZeRO-3 a forward gathers weights from every process, so every process must run as many).
    """

    def __init__(self, *, chunk_tokens: int | None = None, head_impl: str = "auto", layers: int = 0,
                 rescore_drift: float = 0.0, reference=None, attention: bool = False, nuclear_norm: bool = False,
                 logit_sketch: LogitSketch | None = None, lockstep: bool = False):
        if layers < 0 or rescore_drift < 0:
            raise ValueError("layers and rescore_drift must be >= 0")
        self.chunk_tokens = chunk_tokens
        self.head_impl = head_impl
        self.layers = layers
        self.rescore_drift = rescore_drift
        self.reference = reference
        self.attention = attention
        self.nuclear_norm = nuclear_norm
        self.logit_sketch = logit_sketch
        # Kept across passes: the head's factors are recomputed only when its weights change.
        self.summaries = (LogitSummaries(nuclear_norm, logit_sketch) if nuclear_norm or logit_sketch is not None
                          else None)
        self.lockstep = lockstep
        self.path = 0.0       # summed update norms so far
        self.weight_norm = 0.0  # nothing is fresh before the first measured step
        # sample id -> (path when scored, its row's tensors up to its last attended position)
        self._cache: dict[int, tuple[float, dict]] = {}
        self.reused = 0       # samples whose scores came from the cache, over the run
        self.scored = 0       # samples scored afresh

    def moved(self, step_norm: float, weight_norm: float) -> None:
        """One optimizer step moved the weights by `step_norm`; they now have norm `weight_norm`."""
        self.path += step_norm
        self.weight_norm = weight_norm

    def _fresh(self, sample_id: int) -> bool:
        hit = self._cache.get(sample_id)
        return hit is not None and self.path - hit[0] < self.rescore_drift * self.weight_norm

    @torch.no_grad()
    def __call__(self, model, batches: list[dict], entropy_over: str = "response") -> list[BatchScores]:
        """Scores of each of `batches` (no-grad, eval mode: no dropout) with `model`'s current weights."""
        # Inside DDP's or DeepSpeed's wrapper; ZeRO-3 gathers weights through hooks on the module
        # itself, and FSDP2 shards in place (no wrapper), so the module's forward gathers under both.
        scoring = getattr(model, "module", model)
        was_training = scoring.training
        scoring.eval()
        try:
            with first_layers(scoring, self.layers):
                return [self._score(scoring, b, entropy_over, self.summaries) for b in batches]
        finally:
            scoring.train(was_training)

    def _score_rows(self, model, batch: dict, entropy_over: str, summaries: LogitSummaries | None) -> BatchScores:
        def score(scoring, summaries=None):
            return score_batch(scoring, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               entropy_over=entropy_over, chunk_tokens=self.chunk_tokens, head_impl=self.head_impl,
                               summaries=summaries)

        if self.attention:
            with capture_last_layer(model) as captured:
                scores = score(model, summaries)
            probs = attention_probabilities(captured, batch["attention_mask"])
            scores.attention = received_attention(probs, batch["attention_mask"])
        else:
            scores = score(model, summaries)
        if self.reference is not None:
            self.reference.eval()  # (a DeepSpeed engine's eval() returns None)
            scores.reference_nll = score(self.reference).nll
        return scores

    def _score(self, model, batch: dict, entropy_over: str, summaries: LogitSummaries | None) -> BatchScores:
        if not self.rescore_drift:
            scores = self._score_rows(model, batch, entropy_over, summaries)
            self.scored += len(scores.ppl)
            return scores
        ids = batch["sample_id"].tolist()
        stale = [i for i, sid in enumerate(ids) if not self._fresh(sid)]
        width = batch["input_ids"].shape[1]
        optional = {"reference_nll": self.reference is not None, "attention": self.attention,
                    "nuclear_norm": self.nuclear_norm, "logit_sketch": self.logit_sketch is not None}
        fields = [k for k in BatchScores.__dataclass_fields__ if optional.get(k, True)]
        out = {k: [None] * len(ids) for k in fields}
        if stale:
            rows = torch.tensor(stale, device=batch["input_ids"].device)
            new = self._score_rows(model, _rows(batch, rows), entropy_over, summaries)
            # Each row up to its last attended position (0 for an empty row), read in one transfer.
            mask = batch["attention_mask"][rows].bool()
            ends = (mask * torch.arange(1, width + 1, device=mask.device)).max(dim=1).values.tolist()
            for j, i in enumerate(stale):
                row = {k: getattr(new, k)[j] for k in fields}
                row = {k: v[:ends[j]].clone() if k in TOKEN_FIELDS else v.clone() for k, v in row.items()}
                self._cache[ids[i]] = (self.path, row)
        elif self.lockstep:  # this process joins the others' scoring forward (and its gathers) with one row, unused
            self._score_rows(model, _rows(batch, torch.zeros(1, dtype=torch.long, device=batch["input_ids"].device)),
                             entropy_over, summaries)
        self.scored += len(stale)
        self.reused += len(ids) - len(stale)
        for i, sid in enumerate(ids):
            for key, value in self._cache[sid][1].items():
                if key in TOKEN_FIELDS:  # padded back to this micro-batch's width with zeros
                    value = torch.nn.functional.pad(value, (0, width - value.numel()))
                out[key][i] = value
        return BatchScores(**{k: torch.stack(v) for k, v in out.items()})


class DriftMeter:
    """How far one optimizer step moves the trainable weights: `before()` keeps a copy, `after()`
    returns (||theta_new - theta_old||, ||theta_new||). Where the weights are sharded, `shards`
    gives the part of each parameter this process holds and `reduce` sums a tensor over processes
    (`qtune.engine.local_shards`, `qtune.step.reduce_sum`)."""

    def __init__(self, reduce=lambda t: t, shards=list):
        self.reduce = reduce
        self.shards = shards
        self._copy: list[torch.Tensor] | None = None

    def _trainable(self, model) -> list[torch.Tensor]:
        return [t.detach() for t in self.shards([p for p in model.parameters() if p.requires_grad])]

    def before(self, model) -> None:
        self._copy = [t.clone() for t in self._trainable(model)]

    def after(self, model) -> tuple[float, float]:
        params = self._trainable(model)
        if self._copy is None or len(params) != len(self._copy):
            raise RuntimeError("DriftMeter.after without a matching before")
        device = params[0].device
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for new, old in zip(params, self._copy):
            sums[0] += (new.double() - old.double()).pow(2).sum()
            sums[1] += new.double().pow(2).sum()
        self._copy = None
        step, norm = self.reduce(sums).sqrt().tolist()
        return step, norm


def build_scorer(cfg, tokenizer, device, *, needs=frozenset(), dtype: str = "auto", trust_remote_code: bool = False,
                 training_set_pass: bool = False) -> Scorer:
    """The `Scorer` of a config with `qtune.config.ScorerConfig` and `ComputeConfig` fields, for a
    method that `needs` these scores; when "reference_nll" is needed, loads `cfg.reference_model`
    (frozen, on `device`) and checks that `tokenizer` fits it; when "logit_sketch" is needed, the
    sketch is `cfg.uds_sketch_rows` x `cfg.uds_sketch_columns`, hashed from `cfg.seed`.
    `training_set_pass`: the Scorer of a method's one-time pass over the training set
    (`Method.pass_needs`), which scores the initial weights once: every layer, every sample afresh,
    whatever `score_layers` and `rescore_drift` say."""
    reference = None
    if "reference_nll" in needs:
        if not getattr(cfg, "reference_model", None):
            raise QTuneError(f"method {cfg.method!r} needs a reference model's token losses: give --reference-model "
                             "(a model with the same tokenizer, e.g. the base model fine-tuned on a small clean subset)")
        reference = load_model(cfg.reference_model, dtype=dtype, device=str(device),
                               trust_remote_code=trust_remote_code).requires_grad_(False)
        check_vocabulary(reference, tokenizer, cfg.reference_model)
    cheaper = {} if training_set_pass else {"layers": cfg.score_layers, "rescore_drift": cfg.rescore_drift}
    sketch = (LogitSketch(cfg.uds_sketch_rows, cfg.uds_sketch_columns, cfg.seed) if "logit_sketch" in needs
              else None)
    return Scorer(chunk_tokens=cfg.chunk_tokens, head_impl=cfg.head_impl, reference=reference,
                  attention="attention" in needs, nuclear_norm="nuclear_norm" in needs, logit_sketch=sketch,
                  **cheaper)
