"""Q-Tuning's two stages as pure functions on tensors: no model, no I/O.

Stage 1, `triage`: place every sample of a batch on the Error-Uncertainty plane (sample perplexity
PPL, mean predictive entropy Ent), split the plane into four quadrants with batch quantiles, and
keep the "valuable misconceptions" (Q2: high PPL, low Ent) and the "calibration data" (Q4: low PPL,
high Ent).

Stage 2, `prune_tokens`: in the kept Q2 samples, drop from the loss the response tokens whose own
perplexity and whose neighbours' perplexity are high (`token_scores`).

Every choice follows the project's decisions page (docs/pruning.md describes them for users);
`reference=True` in `triage` and `budget="batch"` in `prune_tokens` reproduce the authors' code.
All functions work on CPU and CUDA tensors and return tensors on the device of their inputs.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch

from qtune.errors import QTuneError

#: The names of the quadrant labels of `TriageResult.quadrant`, in every table, plot and file.
QUADRANT_NAMES = {
    1: "Q1 noise",
    2: "Q2 misconception",
    3: "Q3 redundant",
    4: "Q4 calibration",
    0: "middle",
}
#: The order in which tables and plot legends list the quadrants.
QUADRANT_ORDER = (1, 2, 3, 4, 0)

NEIGHBOR_MODES = ("sum", "mean")
EDGE_MODES = ("zero", "replicate")
BUDGET_MODES = ("sample", "batch")

DEFAULT_MAX_ITER = 20
REFERENCE_MAX_ITER = 10
# The authors' code searches a in [0, 0.49] and stops once the kept fraction is this close to
# r_sample.
REFERENCE_LEVEL_HIGH = 0.49
REFERENCE_TOLERANCE = 0.01
# Token perplexity is exp(nll) with nll clamped here, only so that it stays finite in float32.
NLL_CLAMP = 50.0
# Slack added before flooring ratio * n: 0.29 * 100 is 28.999999999999996 in floating point, but
# 29 is meant.
_FLOOR_SLACK = 1e-9


class PruningInputError(QTuneError, ValueError):
    """Invalid input to a pruning function.

    A `QTuneError` so that the CLI prints it as one line, and a `ValueError` for callers who use
    the functions directly.
    """


@dataclass(frozen=True, eq=False)
class TriageResult:
    """The outcome of Stage 1 for one batch of N samples.

    keep: int64 [k], indices of the kept samples, ascending.
    quadrant: int64 [N], 1..4 from the final partition, 0 for the middle band. A sample that
        joined through the supp top-up keeps its own label (1, 3 or 0) and has `fallback` set.
    prune_tokens: bool [N], True for kept samples whose tokens go to Stage 2: the kept Q2
        samples and the fallback samples treated as Q2.
    fallback: bool [N], True for kept samples that joined through the supp top-up.
    level: the shared quantile level `a` of the final partition.
    thresholds: ppl_lo, ppl_hi, ent_lo, ent_hi of the final partition.
    """

    keep: torch.Tensor
    quadrant: torch.Tensor
    prune_tokens: torch.Tensor
    fallback: torch.Tensor
    level: float
    thresholds: dict[str, float]

    def counts(self) -> dict[str, int]:
        """Sample counts for logs: q1..q4 and middle (labels), kept, fallback."""
        per_label = torch.bincount(self.quadrant, minlength=5).tolist()
        return {
            "q1": per_label[1],
            "q2": per_label[2],
            "q3": per_label[3],
            "q4": per_label[4],
            "middle": per_label[0],
            "kept": int(self.keep.numel()),
            "fallback": int(self.fallback.sum()),
        }


# ---------------------------------------------------------------------------------------------
# Validation


def _check_choice(value: str, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PruningInputError(
            f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}"
        )


def _check_ratio(value, name: str) -> None:
    """0 < value <= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PruningInputError(f"{name} must be a number in (0, 1]; got {value!r}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise PruningInputError(f"{name} must be in (0, 1]; got {value!r}")


def _check_lam(lam) -> None:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise PruningInputError(f"lam must be a number in [0, 1]; got {lam!r}")
    if not (math.isfinite(lam) and 0 <= lam <= 1):
        raise PruningInputError(f"lam must be in [0, 1]; got {lam!r}")


def _nonfinite_message(x: torch.Tensor) -> str | None:
    """'3 NaN and 1 inf' for the non-finite values of x, or None when all are finite."""
    n_nan, n_inf = torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum()]).tolist()
    if n_nan == 0 and n_inf == 0:
        return None
    return f"{n_nan} NaN and {n_inf} inf"


def _sample_scores(x, name: str) -> torch.Tensor:
    """Checks one per-sample score vector of `triage` and returns it as a real tensor."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dtype == torch.bool or x.is_complex():
        raise PruningInputError(f"{name} must hold real numbers; got dtype {x.dtype}")
    if x.dim() != 1:
        raise PruningInputError(
            f"{name} must be a 1-D tensor with one score per sample; got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise PruningInputError(f"{name} is empty: triage needs at least one sample")
    if x.is_floating_point():
        bad = _nonfinite_message(x)
        if bad is not None:
            raise PruningInputError(
                f"{name} has non-finite values ({bad} out of {x.numel()} samples); "
                "samples without a response token must be left out before triage"
            )
    return x


def _token_inputs(tokppl, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the [B, L] inputs of Stage 2; returns tokppl as float (>= float32) and the mask."""
    if not isinstance(tokppl, torch.Tensor) or not isinstance(response_mask, torch.Tensor):
        raise PruningInputError("tokppl and response_mask must be torch tensors")
    if tokppl.dim() != 2:
        raise PruningInputError(
            f"tokppl must be a 2-D tensor [batch, length]; got shape {tuple(tokppl.shape)}"
        )
    if tokppl.shape != response_mask.shape:
        raise PruningInputError(
            f"tokppl and response_mask must have the same shape; got {tuple(tokppl.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    if response_mask.dtype != torch.bool:
        raise PruningInputError(
            "response_mask must be a bool tensor (for example labels != -100); "
            f"got {response_mask.dtype}"
        )
    if tokppl.dtype == torch.bool or tokppl.is_complex():
        raise PruningInputError(f"tokppl must hold real numbers; got dtype {tokppl.dtype}")
    response_mask = response_mask.to(tokppl.device)
    tokppl = tokppl.to(torch.promote_types(tokppl.dtype, torch.float32))
    bad = _nonfinite_message(tokppl[response_mask])
    if bad is not None:
        raise PruningInputError(
            f"tokppl has non-finite values at response positions ({bad}); "
            "build it with token_perplexity(nll), which keeps it finite"
        )
    return tokppl, response_mask


# ---------------------------------------------------------------------------------------------
# Shared helpers


def keep_count(ratio: float, n: int) -> int:
    """max(1, floor(ratio * n)) for n >= 1, tolerant to floating-point error (see _FLOOR_SLACK)."""
    return max(1, math.floor(ratio * n + _FLOOR_SLACK))


def _rank(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The rank of each element along `dim`: 0 for the smallest, ties by position (stable sort)."""
    order = torch.sort(x, dim=dim, stable=True).indices
    positions = torch.arange(x.shape[dim], device=x.device)
    shape = [1] * x.dim()
    shape[dim] = -1
    rank = torch.empty_like(order)
    rank.scatter_(dim, order, positions.view(shape).expand_as(order))
    return rank


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation to [0, 1]: each value's position between the smallest (0) and the
    largest (1); a constant vector gives all zeros."""
    low, span = x.min(), x.max() - x.min()
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1), 0)


# ---------------------------------------------------------------------------------------------
# Stage 1: sample triage


def _lower_quantile_index(level: float, n: int) -> int:
    """0-based index in the sorted values of the lower empirical quantile at `level`.

    The smallest q such that at least a fraction `level` of the n values are <= q is the
    ceil(level * n)-th smallest value (at least the 1st).
    """
    return max(math.ceil(level * n), 1) - 1


def _linear_quantile(values_sorted: torch.Tensor, level: float) -> torch.Tensor:
    """numpy.quantile's default (linear interpolation between the two nearest ranks), as the
    authors' code computes its thresholds: position level x (n - 1) in the sorted values."""
    position = level * (values_sorted.numel() - 1)
    below = math.floor(position)
    above = min(below + 1, values_sorted.numel() - 1)
    a, b, t = values_sorted[below], values_sorted[above], position - below
    # Interpolated from the nearer end, as numpy does, so that the thresholds agree to the bit.
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


class _Partition:
    """The quadrants of one batch at one quantile level `a`."""

    def __init__(self, ppl, ent, ppl_sorted, ent_sorted, level: float, reference: bool, keep_q1: bool = False):
        n = ppl.numel()
        self.level = level
        if reference:
            self.ppl_lo, self.ppl_hi = _linear_quantile(ppl_sorted, level), _linear_quantile(ppl_sorted, 1 - level)
            self.ent_lo, self.ent_hi = _linear_quantile(ent_sorted, level), _linear_quantile(ent_sorted, 1 - level)
        else:
            low_index = _lower_quantile_index(level, n)
            high_index = _lower_quantile_index(1 - level, n)
            self.ppl_lo, self.ppl_hi = ppl_sorted[low_index], ppl_sorted[high_index]
            self.ent_lo, self.ent_hi = ent_sorted[low_index], ent_sorted[high_index]
        self.low_ppl, self.low_ent = ppl <= self.ppl_lo, ent <= self.ent_lo
        self.high_ppl, self.high_ent = ppl >= self.ppl_hi, ent >= self.ent_hi
        if reference:
            # The authors' code is strict on exactly these two comparisons.
            self.q2 = (ppl > self.ppl_hi) & self.low_ent
            self.q4 = self.low_ppl & (ent > self.ent_hi)
        else:
            self.q2 = self.high_ppl & self.low_ent
            self.q4 = self.low_ppl & self.high_ent
        self.q1 = self.high_ppl & self.high_ent
        self.member = self.q2 | self.q4
        if keep_q1:
            self.member = self.member | self.q1
        self.kept_count = int(self.member.sum())

    def quadrant(self, tilt: torch.Tensor) -> torch.Tensor:
        """Labels 1..4, 0 for the middle band.

        Precedence when memberships overlap (ties, constant scores): a kept quadrant wins over a
        dropped one; a sample in both Q2 and Q4 goes where the fallback rule would put it (Q2 when
        P^ > E^); Q1 wins over Q3. Q2 and Q4 cannot overlap in reference mode.
        """
        is_q2 = self.q2 & (~self.q4 | (tilt > 0))
        q3 = self.low_ppl & self.low_ent
        middle = torch.zeros_like(tilt, dtype=torch.int64)
        labels = torch.where(self.q1, 1, torch.where(q3, 3, middle))
        return torch.where(is_q2, 2, torch.where(self.q4, 4, labels))

    def thresholds(self) -> dict[str, float]:
        values = torch.stack([self.ppl_lo, self.ppl_hi, self.ent_lo, self.ent_hi]).tolist()
        return dict(zip(("ppl_lo", "ppl_hi", "ent_lo", "ent_hi"), values))


def _search_smallest_level(partition_at, k: int, max_iter: int) -> _Partition:
    """The partition at the smallest a in [0, 0.5) whose Q2 + Q4 holds at least k samples.

    The kept count never decreases with a, so bisection applies; after `max_iter` halvings the
    level is within 0.5 / 2**max_iter above the true smallest one. When no level tried reaches
    k, the largest level tried is used (it keeps the most samples) and the top-up fills in.
    """
    at_zero = partition_at(0.0)
    if at_zero.kept_count >= k:
        return at_zero
    low, high, found = 0.0, 0.5, None
    last = at_zero
    for _ in range(max_iter):
        middle = (low + high) / 2
        last = partition_at(middle)
        if last.kept_count >= k:
            high, found = middle, last
        else:
            low = middle
    # With no success every step moved `low` up: `last` is the partition at the largest level tried.
    return found if found is not None else last


def _search_reference(partition_at, r_sample: float, n: int, max_iter: int) -> _Partition:
    """The authors' search: a in [0, 0.49], Algorithm 1's update, stop when close enough."""
    low, high = 0.0, REFERENCE_LEVEL_HIGH
    for _ in range(max_iter):
        partition = partition_at((low + high) / 2)
        fraction = partition.kept_count / n
        if abs(fraction - r_sample) < REFERENCE_TOLERANCE:
            break
        if fraction < r_sample:
            low = partition.level
        else:
            high = partition.level
    return partition


def triage(
    ppl, ent, r_sample: float, *, max_iter: int | None = None, reference: bool = False, keep_q1: bool = False
) -> TriageResult:
    """Stage 1: choose the samples of one batch to train on.

    ppl, ent: 1-D tensors [N] of sample perplexity and mean token entropy (finite, N >= 1).
    r_sample: target fraction of samples kept, in (0, 1].
    max_iter: bisection steps; default 20, or 10 with reference=True.
    reference: reproduce the authors' code (see docs/pruning.md) instead of this project's rules.
    keep_q1: the paper's "keep Q1" ablation: Q1 (high PPL, high entropy) counts as a kept quadrant
        beside Q2 and Q4, in the level search and in the priority, and its tokens are pruned as
        Q2's (both are high-error samples).

    By default exactly max(1, floor(r_sample * N)) samples are kept: the Q2 + Q4 samples at the
    smallest shared quantile level that yields enough of them, trimmed or topped up by
    supp = |P^ - E^| (min-max normalised PPL and Ent), ties broken by index.
    """
    ppl = _sample_scores(ppl, "ppl")
    ent = _sample_scores(ent, "ent")
    if ppl.shape != ent.shape:
        raise PruningInputError(
            f"ppl and ent must have the same length; got {ppl.numel()} and {ent.numel()}"
        )
    if ppl.device != ent.device:
        raise PruningInputError(
            f"ppl and ent must be on the same device; got {ppl.device} and {ent.device}"
        )
    _check_ratio(r_sample, "r_sample")
    if max_iter is None:
        max_iter = REFERENCE_MAX_ITER if reference else DEFAULT_MAX_ITER
    is_count = isinstance(max_iter, numbers.Integral) and not isinstance(max_iter, bool)
    if not is_count or max_iter < 1:
        raise PruningInputError(f"max_iter must be a positive integer; got {max_iter!r}")

    # float64 keeps the normalised scores from tying by rounding (MPS has no float64).
    work_dtype = torch.float32 if ppl.device.type == "mps" else torch.float64
    ppl, ent = ppl.to(work_dtype), ent.to(work_dtype)
    n = ppl.numel()
    ppl_sorted, ent_sorted = torch.sort(ppl).values, torch.sort(ent).values
    tilt = min_max(ppl) - min_max(ent)  # P^ - E^: > 0 leans to Q2, < 0 to Q4

    def partition_at(level: float) -> _Partition:
        return _Partition(ppl, ent, ppl_sorted, ent_sorted, level, reference, keep_q1)

    if reference:
        partition = _search_reference(partition_at, r_sample, n, max_iter)
        # Top up only, never trim; round() is Python's, half to even, as in the authors' code.
        target = max(partition.kept_count, min(n, max(1, round(r_sample * n))))
    else:
        target = keep_count(r_sample, n)
        partition = _search_smallest_level(partition_at, target, max_iter)

    # Priority: Q2 + Q4 members first, then larger supp, then lower index. Members beyond the
    # target leave with the smallest supp; missing places go to the largest-supp non-members.
    supp = tilt.abs()
    by_supp = torch.sort(supp, descending=True, stable=True).indices
    members_first = torch.sort((~partition.member[by_supp]).to(torch.uint8), stable=True).indices
    keep = torch.sort(by_supp[members_first][:target]).values

    kept = torch.zeros(n, dtype=torch.bool, device=ppl.device)
    kept[keep] = True
    quadrant = partition.quadrant(tilt)
    fallback = kept & ~partition.member
    # A fallback sample is treated as Q2 when it leans to the high-PPL side; the authors' code
    # counts a tie as Q2, this project as Q4 (all tokens kept).
    leans_q2 = tilt >= 0 if reference else tilt > 0
    high_error = (quadrant == 2) | (quadrant == 1) if keep_q1 else quadrant == 2
    prune = kept & (high_error | (fallback & leans_q2))
    return TriageResult(
        keep=keep,
        quadrant=quadrant,
        prune_tokens=prune,
        fallback=fallback,
        level=partition.level,
        thresholds=partition.thresholds(),
    )


# ---------------------------------------------------------------------------------------------
# Stage 2: token pruning


def token_perplexity(nll) -> torch.Tensor:
    """Token perplexity exp(min(nll, 50)) in float32; the clamp only keeps it finite."""
    nll = torch.as_tensor(nll)
    return torch.exp(nll.to(torch.float32).clamp(max=NLL_CLAMP))


def _neighbour_scores(tokppl, response_mask, lam: float, neighbor: str, edge: str,
                      bridge: bool = True) -> torch.Tensor:
    """s_i at response positions, +inf elsewhere (inputs already checked)."""
    batch, length = tokppl.shape
    if tokppl.numel() == 0:
        return torch.full_like(tokppl, math.inf)
    device = tokppl.device
    if not bridge:
        # Only the adjacent positions are neighbours, and only when they are response positions.
        missing = torch.zeros_like(tokppl) if edge == "zero" else tokppl
        before = torch.zeros_like(response_mask)
        before[:, 1:] = response_mask[:, :-1]
        after = torch.zeros_like(response_mask)
        after[:, :-1] = response_mask[:, 1:]
        previous_value = torch.where(before, tokppl.roll(1, dims=1), missing)
        following_value = torch.where(after, tokppl.roll(-1, dims=1), missing)
        neighbours = previous_value + following_value
        if neighbor == "mean":
            neighbours = neighbours / 2
        return torch.where(response_mask, (1 - lam) * tokppl + lam * neighbours, math.inf)
    positions = torch.arange(length, device=device).expand(batch, length)
    # The nearest response position at or before / at or after each position; shifting by one
    # gives the previous / next response position, across any prompt or padding in between.
    at_or_before = torch.where(response_mask, positions, -1).cummax(dim=1).values
    at_or_after = torch.where(response_mask, positions, length).flip(1).cummin(dim=1).values.flip(1)
    previous = torch.cat([torch.full_like(at_or_before[:, :1], -1), at_or_before[:, :-1]], dim=1)
    following = torch.cat([at_or_after[:, 1:], torch.full_like(at_or_after[:, :1], length)], dim=1)

    missing = torch.zeros_like(tokppl) if edge == "zero" else tokppl
    previous_value = tokppl.gather(1, previous.clamp(min=0))
    following_value = tokppl.gather(1, following.clamp(max=length - 1))
    previous_value = torch.where(previous >= 0, previous_value, missing)
    following_value = torch.where(following < length, following_value, missing)
    neighbours = previous_value + following_value
    if neighbor == "mean":
        neighbours = neighbours / 2
    scores = (1 - lam) * tokppl + lam * neighbours
    return torch.where(response_mask, scores, math.inf)


def token_scores(
    tokppl, response_mask, *, lam: float = 0.5, neighbor: str = "sum", edge: str = "zero"
) -> torch.Tensor:
    """Neighbour-aware token scores [B, L]: high means the token and its neighbours are surprising.

    s_i = (1 - lam) * tokppl_i + lam * (tokppl_prev + tokppl_next), or half the neighbour sum with
    neighbor="mean". Neighbours are the previous and next RESPONSE positions of the row (a prompt
    or padding position is never a neighbour; two assistant spans of a conversation are bridged).
    A missing neighbour at either end counts 0 (edge="zero") or as the token itself
    (edge="replicate"). Positions outside response_mask get +inf.
    """
    tokppl, response_mask = _token_inputs(tokppl, response_mask)
    _check_lam(lam)
    _check_choice(neighbor, "neighbor", NEIGHBOR_MODES)
    _check_choice(edge, "edge", EDGE_MODES)
    return _neighbour_scores(tokppl, response_mask, lam, neighbor, edge)


@functools.lru_cache(maxsize=64)
def _keep_counts(r_token: float, length: int) -> tuple[int, ...]:
    """keep_count(r_token, n) for n = 0 .. length."""
    return tuple(keep_count(r_token, n) for n in range(length + 1))


def prune_tokens(
    tokppl,
    response_mask,
    r_token: float,
    *,
    lam: float = 0.5,
    neighbor: str = "sum",
    edge: str = "zero",
    budget: str = "sample",
    rows=None,
    batch_keep: int | None = None,
    reverse: bool = False,
    bridge: bool = True,
) -> torch.Tensor:
    """Stage 2: bool mask [B, L], True where a response token keeps its loss.

    rows: bool [B], the rows to prune (the Q2 rows, e.g. TriageResult.prune_tokens); default all.
        Rows not selected keep every response token.
    budget="sample": each selected row keeps its max(1, floor(r_token * n)) response tokens with
        the lowest token_scores (ties by position), n = its number of response tokens.
    budget="batch" (authors' code): `batch_keep` tokens survive over the whole batch, counting
        every response token of every row; the excess is removed from the pooled response tokens
        of the selected rows, highest score first (ties: later row, then later position, first).
        When the excess exceeds the pool, the whole pool is removed and more than `batch_keep`
        tokens survive; a selected row can lose all its tokens. r_token is only checked.
    reverse: the paper's "Reversed PPL" ablation: the tokens of HIGHEST score keep their loss
        (each rule above with the scores negated; ties still by position).
    bridge: the neighbours of a token are the previous and next RESPONSE positions, across any
        prompt in between (default); False: the adjacent positions only, a non-response one
        counting as missing (the authors' code: no bridging across the turns of a conversation).
    The output is False outside response_mask.
    """
    tokppl, response_mask = _token_inputs(tokppl, response_mask)
    _check_ratio(r_token, "r_token")
    _check_lam(lam)
    _check_choice(neighbor, "neighbor", NEIGHBOR_MODES)
    _check_choice(edge, "edge", EDGE_MODES)
    _check_choice(budget, "budget", BUDGET_MODES)
    batch = tokppl.shape[0]
    if rows is None:
        rows = torch.ones(batch, dtype=torch.bool, device=tokppl.device)
    else:
        rows = torch.as_tensor(rows)
        if rows.dtype != torch.bool or rows.shape != (batch,):
            raise PruningInputError(
                f"rows must be a bool tensor of shape ({batch},) (a mask, not indices); "
                f"got {rows.dtype} of shape {tuple(rows.shape)}"
            )
        rows = rows.to(tokppl.device)
    if budget == "batch":
        is_count = isinstance(batch_keep, numbers.Integral) and not isinstance(batch_keep, bool)
        if not is_count or batch_keep < 0:
            raise PruningInputError(
                "budget='batch' needs batch_keep, a non-negative number of tokens; "
                f"got {batch_keep!r}"
            )
    elif batch_keep is not None:
        raise PruningInputError("batch_keep only applies to budget='batch'")

    if budget == "sample":
        # Rows are independent: only the selected ones are scored and ranked. The count for every
        # possible row length is looked up per row: the same Python arithmetic as triage, without
        # a device-to-host copy of the row lengths.
        chosen = rows.nonzero().squeeze(1)
        chosen_mask = response_mask[chosen]
        scores = _neighbour_scores(tokppl[chosen], chosen_mask, lam, neighbor, edge, bridge)
        if reverse:
            scores = torch.where(chosen_mask, -scores, math.inf)
        count_for_length = torch.tensor(_keep_counts(r_token, tokppl.shape[1]), device=tokppl.device)
        n_keep = count_for_length[chosen_mask.sum(dim=1)]
        keeps_its_loss = response_mask.clone()
        keeps_its_loss[chosen] = chosen_mask & (_rank(scores, dim=1) < n_keep[:, None])
        return keeps_its_loss
    scores = _neighbour_scores(tokppl, response_mask, lam, neighbor, edge, bridge)
    if reverse:
        scores = torch.where(response_mask, -scores, math.inf)
    selected = response_mask & rows[:, None]
    excess = response_mask.sum() - batch_keep
    pooled_scores = torch.where(selected, scores, math.inf).reshape(-1)
    # The pooled tokens rank first (lowest score first); the last `excess` of them go. An excess
    # beyond the pool leaves a negative bound: the whole pool goes.
    keeps_its_loss = (_rank(pooled_scores) < selected.sum() - excess).view_as(selected)
    return response_mask & (~selected | keeps_its_loss)
