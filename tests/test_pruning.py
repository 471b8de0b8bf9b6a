"""Tests for qtune.pruning: Stage 1 (triage) and Stage 2 (token scores and pruning).

Property checks run over seeded random cases (many N, ratios and score distributions) and compare
against brute-force reference implementations written plainly below, one sample or token at a time.
"""

from __future__ import annotations

import bisect
import math
import random

import numpy
import pytest
import torch

from qtune.errors import QTuneError
from qtune.pruning import (
    QUADRANT_NAMES,
    QUADRANT_ORDER,
    PruningInputError,
    TriageResult,
    prune_tokens,
    token_perplexity,
    token_scores,
    triage,
)

RATIOS = [0.01, 0.1, 0.125, 0.2, 0.25, 1 / 3, 0.5, 0.7, 0.9, 0.99, 1.0]
DISTRIBUTIONS = [
    "uniform", "small_int", "constant", "correlated", "anticorrelated", "lognormal", "outlier"
]


def make_scores(rng: random.Random, n: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (ppl, ent) pair of one kind of distribution; small_int and constant produce many ties."""
    if kind == "uniform":
        ppl = [rng.uniform(1, 20) for _ in range(n)]
        ent = [rng.uniform(0, 3) for _ in range(n)]
    elif kind == "small_int":
        ppl = [float(rng.randint(1, 3)) for _ in range(n)]
        ent = [float(rng.randint(0, 2)) for _ in range(n)]
    elif kind == "constant":
        ppl, ent = [4.0] * n, [1.5] * n
    elif kind in ("correlated", "anticorrelated"):
        base = [rng.gauss(0, 1) for _ in range(n)]
        sign = 1 if kind == "correlated" else -1
        ppl = [math.exp(1 + b + 0.3 * rng.gauss(0, 1)) for b in base]
        ent = [2 + sign * b + 0.3 * rng.gauss(0, 1) for b in base]
    elif kind == "lognormal":
        ppl = [math.exp(rng.gauss(1, 1.5)) for _ in range(n)]
        ent = [math.exp(rng.gauss(0, 1)) for _ in range(n)]
    else:  # one extreme sample among ordinary ones
        ppl = [rng.uniform(1, 2) for _ in range(n)]
        ent = [rng.uniform(1, 2) for _ in range(n)]
        ppl[rng.randrange(n)] = 1e6
    return torch.tensor(ppl, dtype=torch.float32), torch.tensor(ent, dtype=torch.float32)


def random_cases(seed: int, count: int, max_n: int = 64):
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.randint(1, max_n)
        ratio = rng.choice(RATIOS + [rng.uniform(0.01, 1.0)])
        ppl, ent = make_scores(rng, n, rng.choice(DISTRIBUTIONS))
        yield n, ratio, ppl, ent


# ---------------------------------------------------------------------------------------------
# Brute-force Stage 1, one sample at a time


def bf_quantile(values: list[float], g: float) -> float:
    """The smallest q such that at least a fraction g of the values are <= q."""
    ordered = sorted(values)
    for q in ordered:
        if bisect.bisect_right(ordered, q) >= g * len(values):  # how many values are <= q
            return q
    return ordered[-1]


def bf_min_max(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        return [0.0] * len(values)
    return [(v - low) / (high - low) for v in values]


def bf_partition(ppl: list[float], ent: list[float], a: float, strict: bool = False):
    """(members of Q2 + Q4, labels, thresholds) at level a, precedence as documented; `strict`
    (the authors' code) also takes numpy's linearly interpolated quantiles."""
    quantile = (lambda v, g: float(numpy.quantile(numpy.array(v, dtype=numpy.float64), g))) if strict else bf_quantile
    ppl_hi, ppl_lo = quantile(ppl, 1 - a), quantile(ppl, a)
    ent_lo, ent_hi = quantile(ent, a), quantile(ent, 1 - a)
    tilt = [p - e for p, e in zip(bf_min_max(ppl), bf_min_max(ent))]
    members, labels = [], []
    for i, (p, e) in enumerate(zip(ppl, ent)):
        in_q2 = (p > ppl_hi if strict else p >= ppl_hi) and e <= ent_lo
        in_q4 = p <= ppl_lo and (e > ent_hi if strict else e >= ent_hi)
        in_q1 = p >= ppl_hi and e >= ent_hi
        in_q3 = p <= ppl_lo and e <= ent_lo
        if in_q2 and in_q4:
            label = 2 if tilt[i] > 0 else 4
        elif in_q2:
            label = 2
        elif in_q4:
            label = 4
        elif in_q1:
            label = 1
        elif in_q3:
            label = 3
        else:
            label = 0
        members.append(in_q2 or in_q4)
        labels.append(label)
    return members, labels, dict(ppl_lo=ppl_lo, ppl_hi=ppl_hi, ent_lo=ent_lo, ent_hi=ent_hi)


def bf_count(ppl, ent, a, strict=False) -> int:
    return sum(bf_partition(ppl, ent, a, strict)[0])


def bf_select(members: list[bool], supp: list[float], target: int) -> list[int]:
    """Members first, then larger supp, then lower index; the first `target`, ascending."""
    order = sorted(range(len(members)), key=lambda i: (not members[i], -supp[i], i))
    return sorted(order[:target])


def bf_triage(ppl_t, ent_t, r_sample, max_iter=20):
    """This project's triage, written from the decisions page one step at a time."""
    ppl, ent = [float(v) for v in ppl_t], [float(v) for v in ent_t]
    n = len(ppl)
    k = max(1, math.floor(r_sample * n + 1e-9))
    if bf_count(ppl, ent, 0.0) >= k:
        level = 0.0
    else:
        low, high, found = 0.0, 0.5, False
        for _ in range(max_iter):
            middle = (low + high) / 2
            if bf_count(ppl, ent, middle) >= k:
                high, found = middle, True
            else:
                low = middle
        level = high if found else low
    members, labels, thresholds = bf_partition(ppl, ent, level)
    tilt = [p - e for p, e in zip(bf_min_max(ppl), bf_min_max(ent))]
    keep = bf_select(members, [abs(t) for t in tilt], k)
    fallback = [i in keep and not members[i] for i in range(n)]
    prune = [i in keep and (labels[i] == 2 or (fallback[i] and tilt[i] > 0)) for i in range(n)]
    return dict(
        keep=keep, quadrant=labels, prune=prune, fallback=fallback, level=level, thresholds=thresholds
    )


def bf_reference_triage(ppl_t, ent_t, r_sample, max_iter=10):
    """The authors' reading: strict Q2/Q4 edges, [0, 0.49], tolerance stop, top-up only."""
    ppl, ent = [float(v) for v in ppl_t], [float(v) for v in ent_t]
    n = len(ppl)
    low, high = 0.0, 0.49
    for _ in range(max_iter):
        a = (low + high) / 2
        fraction = bf_count(ppl, ent, a, strict=True) / n
        if abs(fraction - r_sample) < 0.01:
            break
        if fraction < r_sample:
            low = a
        else:
            high = a
    members, labels, thresholds = bf_partition(ppl, ent, a, strict=True)
    target = max(sum(members), min(n, max(1, round(r_sample * n))))
    tilt = [p - e for p, e in zip(bf_min_max(ppl), bf_min_max(ent))]
    keep = bf_select(members, [abs(t) for t in tilt], target)
    fallback = [i in keep and not members[i] for i in range(n)]
    prune = [i in keep and (labels[i] == 2 or (fallback[i] and tilt[i] >= 0)) for i in range(n)]
    return dict(
        keep=keep, quadrant=labels, prune=prune, fallback=fallback, level=a, thresholds=thresholds
    )


def assert_matches(result: TriageResult, expected: dict) -> None:
    assert result.keep.tolist() == expected["keep"]
    assert result.quadrant.tolist() == expected["quadrant"]
    assert result.prune_tokens.tolist() == expected["prune"]
    assert result.fallback.tolist() == expected["fallback"]
    assert result.level == expected["level"]
    assert result.thresholds == expected["thresholds"]


# ---------------------------------------------------------------------------------------------
# Stage 1


def test_triage_matches_brute_force_on_random_batches():
    for n, ratio, ppl, ent in random_cases(seed=1, count=200):
        assert_matches(triage(ppl, ent, ratio), bf_triage(ppl, ent, ratio))


def test_reference_triage_matches_brute_force_on_random_batches():
    for n, ratio, ppl, ent in random_cases(seed=2, count=200):
        assert_matches(triage(ppl, ent, ratio, reference=True), bf_reference_triage(ppl, ent, ratio))


def test_triage_keeps_exactly_k_for_every_n_ratio_and_distribution():
    rng = random.Random(3)
    for n in range(1, 65):
        for kind in DISTRIBUTIONS:
            ppl, ent = make_scores(rng, n, kind)
            ratio = rng.choice(RATIOS + [rng.uniform(0.01, 1.0)])
            result = triage(ppl, ent, ratio)
            k = max(1, math.floor(ratio * n + 1e-9))
            assert result.keep.numel() == k, (n, kind, ratio)
            keep = result.keep.tolist()
            assert keep == sorted(set(keep)) and all(0 <= i < n for i in keep)


def test_reference_mode_count_rule():
    # Tops up to max(1, round(r * N)) but never trims what the last partition kept.
    saw_overshoot = False
    for n, ratio, ppl, ent in random_cases(seed=4, count=400):
        result = triage(ppl, ent, ratio, reference=True)
        members = (result.quadrant == 2) | (result.quadrant == 4)
        target = max(1, round(ratio * n))
        assert result.keep.numel() == max(int(members.sum()), target)
        assert not result.fallback[members].any()
        saw_overshoot |= result.keep.numel() > target
    assert saw_overshoot


def test_quadrant_labels_agree_with_returned_thresholds():
    for n, ratio, ppl, ent in random_cases(seed=5, count=200):
        for reference in (False, True):
            result = triage(ppl, ent, ratio, reference=reference)
            t = result.thresholds
            assert t["ppl_lo"] <= t["ppl_hi"] and t["ent_lo"] <= t["ent_hi"]
            labels = result.quadrant.tolist()
            for p, e, label in zip(ppl.double().tolist(), ent.double().tolist(), labels):
                high_ppl = p > t["ppl_hi"] if reference else p >= t["ppl_hi"]
                high_ent = e > t["ent_hi"] if reference else e >= t["ent_hi"]
                in_q2 = high_ppl and e <= t["ent_lo"]
                in_q4 = p <= t["ppl_lo"] and high_ent
                if label == 2:
                    assert in_q2
                elif label == 4:
                    assert in_q4
                else:
                    assert not in_q2 and not in_q4
                    in_q1 = p >= t["ppl_hi"] and e >= t["ent_hi"]
                    in_q3 = p <= t["ppl_lo"] and e <= t["ent_lo"]
                    assert label == (1 if in_q1 else 3 if in_q3 else 0)


def test_thresholds_are_lower_empirical_quantiles_at_the_level():
    for n, ratio, ppl, ent in random_cases(seed=6, count=100):
        result = triage(ppl, ent, ratio)
        values_p, values_e = ppl.double().tolist(), ent.double().tolist()
        a = result.level
        assert result.thresholds == {
            "ppl_lo": bf_quantile(values_p, a),
            "ppl_hi": bf_quantile(values_p, 1 - a),
            "ent_lo": bf_quantile(values_e, a),
            "ent_hi": bf_quantile(values_e, 1 - a),
        }


def test_bisection_finds_the_smallest_level():
    reached = 0
    for max_iter in (20, 6):
        for n, ratio, ppl, ent in random_cases(seed=7, count=100):
            values_p, values_e = ppl.double().tolist(), ent.double().tolist()
            k = max(1, math.floor(ratio * n + 1e-9))
            result = triage(ppl, ent, ratio, max_iter=max_iter)
            a = result.level
            assert 0 <= a < 0.5
            step = 0.5 / 2**max_iter
            # The kept count never decreases with a (this is what makes bisection valid).
            grid = [i / 31 * 0.4999 for i in range(32)]
            counts = [bf_count(values_p, values_e, g) for g in grid]
            assert counts == sorted(counts)
            if bf_count(values_p, values_e, a) >= k:
                reached += 1
                assert not result.fallback.any()
                # Nothing below the returned level (up to the bisection's resolution) reaches k.
                if a > 0:
                    assert bf_count(values_p, values_e, a - step) < k
                assert all(c < k for g, c in zip(grid, counts) if g <= a - step)
            else:
                # k is out of reach: the level is the largest tried and the top-up fills in.
                assert a == 0.5 - step
                assert result.fallback.sum() == k - bf_count(values_p, values_e, a)
    assert reached > 40


def test_fallback_flags_and_token_pruning_of_fallback_samples():
    saw_fallback_q2 = saw_fallback_q4 = False
    for n, ratio, ppl, ent in random_cases(seed=8, count=300):
        result = triage(ppl, ent, ratio)
        tilt = [p - e for p, e in zip(bf_min_max(ppl.tolist()), bf_min_max(ent.tolist()))]
        kept = torch.zeros(n, dtype=torch.bool)
        kept[result.keep] = True
        members = (result.quadrant == 2) | (result.quadrant == 4)
        assert torch.equal(result.fallback, kept & ~members)
        assert not (result.prune_tokens & ~kept).any()
        for i in result.keep.tolist():
            if result.fallback[i]:
                assert result.quadrant[i] in (0, 1, 3)
                assert bool(result.prune_tokens[i]) == bool(tilt[i] > 0)
                saw_fallback_q2 |= bool(tilt[i] > 0)
                saw_fallback_q4 |= bool(tilt[i] <= 0)
            else:
                assert bool(result.prune_tokens[i]) == (result.quadrant[i] == 2)
    assert saw_fallback_q2 and saw_fallback_q4


def test_trimming_drops_the_smallest_supp_first():
    # Four samples on the anti-diagonal, keep 1: already at a = 0, Q2 + Q4 holds 2.
    ppl = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ent = torch.tensor([4.0, 3.0, 2.0, 1.0])
    result = triage(ppl, ent, 0.25)
    # At a = 0 sample 3 (max PPL, min Ent) is Q2 and sample 0 (min PPL, max Ent) is Q4; both have
    # supp 1; the tie goes to the lower index.
    assert result.level == 0.0
    assert result.quadrant.tolist() == [4, 0, 0, 2]
    assert result.keep.tolist() == [0]
    assert result.prune_tokens.tolist() == [False] * 4


def test_fallback_joins_by_largest_supp_then_index():
    # PPL and Ent rise together: no level puts any sample in Q2 or Q4, all 3 kept samples join.
    ppl = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    ent = torch.tensor([1.0, 2.5, 3.0, 3.5, 5.0, 6.0])
    # P^ = [0, .2, .4, .6, .8, 1]; E^ = [0, .3, .4, .5, .8, 1]; supp = [0, .1, 0, .1, 0, 0]:
    # samples 1 and 3, then the lowest index among the zeros, sample 0.
    result = triage(ppl, ent, 0.5)
    assert result.keep.tolist() == [0, 1, 3]
    assert result.fallback.tolist() == [True, True, False, True, False, False]
    assert not ((result.quadrant == 2) | (result.quadrant == 4)).any()
    # Sample 3 leans to Q2 (P^ > E^), sample 1 to Q4, sample 0 is on the diagonal: Q4 here ...
    assert result.prune_tokens.tolist() == [False, False, False, True, False, False]
    # ... and Q2 in the authors' code (P^ >= E^).
    reference = triage(ppl, ent, 0.5, reference=True)
    assert reference.keep.tolist() == [0, 1, 3]
    assert reference.prune_tokens.tolist() == [True, False, False, True, False, False]


def test_constant_scores():
    for n in (1, 2, 5, 16, 33):
        for ratio in (0.1, 0.5, 1.0):
            ppl, ent = torch.full((n,), 3.0), torch.full((n,), 0.7)
            result = triage(ppl, ent, ratio)
            k = max(1, math.floor(ratio * n + 1e-9))
            # Every sample sits on every threshold: all are Q2 and Q4 at once, P^ = E^ = 0, so all are
            # labelled Q4 (kept whole), the lowest indices are kept, and nothing is token-pruned.
            assert result.level == 0.0
            assert result.quadrant.tolist() == [4] * n
            assert result.keep.tolist() == list(range(k))
            assert not result.prune_tokens.any() and not result.fallback.any()
            reference = triage(ppl, ent, ratio, reference=True)
            # Strict edges make every sample Q1 (>= on both) in reference mode; ties join by index and,
            # with P^ = E^, are token-pruned as Q2 as in the authors' code.
            assert reference.quadrant.tolist() == [1] * n
            target = max(1, round(ratio * n))
            assert reference.keep.tolist() == list(range(target))
            assert reference.fallback.sum() == target == reference.prune_tokens.sum()


def test_single_sample():
    for reference in (False, True):
        for ratio in (0.01, 0.5, 1.0):
            result = triage(torch.tensor([7.0]), torch.tensor([0.3]), ratio, reference=reference)
            assert result.keep.tolist() == [0]
            counts = result.counts()
            assert counts["kept"] == 1
            assert sum(counts[key] for key in ("q1", "q2", "q3", "q4", "middle")) == 1
    assert triage(torch.tensor([7.0]), torch.tensor([0.3]), 0.5).quadrant.tolist() == [4]


def test_triage_is_deterministic_and_accepts_other_dtypes():
    for n, ratio, ppl, ent in random_cases(seed=9, count=30):
        first, second = triage(ppl, ent, ratio), triage(ppl.clone(), ent.clone(), ratio)
        assert torch.equal(first.keep, second.keep) and torch.equal(first.quadrant, second.quadrant)
        assert torch.equal(first.prune_tokens, second.prune_tokens) and first.level == second.level
    ints = triage(torch.tensor([3, 1, 2, 5]), torch.tensor([1, 2, 0, 0]), 0.5)
    floats = triage(torch.tensor([3.0, 1, 2, 5]), torch.tensor([1.0, 2, 0, 0]), 0.5)
    assert ints.keep.tolist() == floats.keep.tolist()
    assert triage([3.0, 1.0], [0.5, 0.7], 0.5).keep.numel() == 1
    half = triage(torch.tensor([3.0, 1, 2, 5], dtype=torch.bfloat16), torch.tensor([1.0, 2, 0, 0]), 0.5)
    assert half.keep.tolist() == floats.keep.tolist()


def test_triage_output_types_and_counts():
    ppl, ent = make_scores(random.Random(10), 20, "uniform")
    result = triage(ppl, ent, 0.25)
    assert result.keep.dtype == torch.int64 and result.quadrant.dtype == torch.int64
    assert result.prune_tokens.dtype == torch.bool and result.fallback.dtype == torch.bool
    assert result.quadrant.shape == (20,) and result.prune_tokens.shape == (20,)
    assert isinstance(result.level, float)
    assert set(result.thresholds) == {"ppl_lo", "ppl_hi", "ent_lo", "ent_hi"}
    counts = result.counts()
    assert set(counts) == {"q1", "q2", "q3", "q4", "middle", "kept", "fallback"}
    assert sum(counts[f"q{i}"] for i in range(1, 5)) + counts["middle"] == 20
    assert counts == {
        "q1": int((result.quadrant == 1).sum()),
        "q2": int((result.quadrant == 2).sum()),
        "q3": int((result.quadrant == 3).sum()),
        "q4": int((result.quadrant == 4).sum()),
        "middle": int((result.quadrant == 0).sum()),
        "kept": 5,
        "fallback": int(result.fallback.sum()),
    }
    assert set(QUADRANT_NAMES) == {0, 1, 2, 3, 4} and sorted(QUADRANT_ORDER) == sorted(QUADRANT_NAMES)
    with pytest.raises(AttributeError):
        result.level = 0.3  # frozen


def test_ratio_is_read_as_the_intended_fraction():
    # floor(0.29 * 100) is 28 in floating point; 29 samples are meant.
    ppl, ent = make_scores(random.Random(11), 100, "uniform")
    assert triage(ppl, ent, 0.29).keep.numel() == 29
    assert triage(ppl, ent, 0.07).keep.numel() == 7


@pytest.mark.parametrize(
    "ppl, ent, message",
    [
        ([1.0, math.nan, 2.0], [0.1, 0.2, 0.3], r"ppl has non-finite values \(1 NaN and 0 inf out of 3"),
        ([1.0, 2.0, 3.0], [math.inf, -math.inf, math.nan], r"ent has non-finite values \(1 NaN and 2 inf"),
        ([], [], "ppl is empty"),
        ([1.0, 2.0], [1.0], "same length"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "ppl must be a 1-D tensor"),
        ([True, False], [1.0, 2.0], "real numbers"),
    ],
)
def test_triage_rejects_bad_scores(ppl, ent, message):
    with pytest.raises(ValueError, match=message):
        triage(torch.tensor(ppl), torch.tensor(ent), 0.5)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_triage_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="r_sample"):
        triage(torch.rand(4), torch.rand(4), ratio)


@pytest.mark.parametrize("max_iter", [0, -1, 2.5, True])
def test_triage_rejects_bad_max_iter(max_iter):
    with pytest.raises(ValueError, match="max_iter"):
        triage(torch.rand(4), torch.rand(4), 0.5, max_iter=max_iter)


def test_errors_are_user_errors_too():
    with pytest.raises(QTuneError):
        triage(torch.tensor([float("nan")]), torch.tensor([1.0]), 0.5)
    assert issubclass(PruningInputError, ValueError) and issubclass(PruningInputError, QTuneError)


# ---------------------------------------------------------------------------------------------
# Brute-force Stage 2, one token at a time


def bf_scores_row(values, mask, lam: float, neighbor: str, edge: str) -> dict[int, float]:
    """Score of every response position of one row, keyed by position."""
    positions = [j for j, m in enumerate(mask) if m]
    scores = {}
    for rank, j in enumerate(positions):
        own = values[j]
        missing = 0.0 if edge == "zero" else own
        previous = values[positions[rank - 1]] if rank > 0 else missing
        following = values[positions[rank + 1]] if rank + 1 < len(positions) else missing
        neighbours = previous + following
        if neighbor == "mean":
            neighbours /= 2
        scores[j] = (1 - lam) * own + lam * neighbours
    return scores


def bf_keep_row(scores: dict[int, float], r_token: float) -> set[int]:
    if not scores:
        return set()
    count = max(1, math.floor(r_token * len(scores) + 1e-9))
    return set(sorted(scores, key=lambda j: (scores[j], j))[:count])


def random_token_batch(rng: random.Random, integer: bool):
    """tokppl [B, L] and a response mask with prompts, gaps between spans, padding, empty rows."""
    batch, length = rng.randint(1, 6), rng.randint(1, 24)
    values, mask = [], []
    for _ in range(batch):
        style = rng.random()
        if style < 0.1:
            row_mask = [False] * length
        elif style < 0.5:
            start = rng.randint(0, length - 1)
            end = rng.randint(start + 1, length)
            row_mask = [start <= j < end for j in range(length)]
        else:
            row_mask = [rng.random() < 0.6 for _ in range(length)]
        # Non-response positions hold garbage that must never leak into a score.
        row = [
            (float(rng.randint(1, 4)) if integer else math.exp(rng.uniform(0, 6)))
            if m
            else rng.choice([1e30, -5.0, 0.0, math.nan, math.inf])
            for m in row_mask
        ]
        values.append(row)
        mask.append(row_mask)
    return values, mask


def test_token_scores_match_brute_force():
    rng = random.Random(20)
    for _ in range(200):
        integer = rng.random() < 0.5
        values, mask = random_token_batch(rng, integer)
        lam = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) if integer else rng.uniform(0, 1)
        neighbor, edge = rng.choice(["sum", "mean"]), rng.choice(["zero", "replicate"])
        options = dict(lam=lam, neighbor=neighbor, edge=edge)
        scores = token_scores(torch.tensor(values), torch.tensor(mask), **options)
        for row, row_values, row_mask in zip(scores.tolist(), values, mask):
            expected = bf_scores_row(row_values, row_mask, lam, neighbor, edge)
            for j, score in enumerate(row):
                if row_mask[j]:
                    # Integer data with dyadic lam is exact in float32.
                    assert score == (expected[j] if integer else pytest.approx(expected[j], rel=1e-6))
                else:
                    assert score == math.inf


def test_prune_tokens_keeps_the_lowest_scores_per_sample():
    rng = random.Random(21)
    for _ in range(300):
        integer = rng.random() < 0.6  # small integers: many exact ties, broken by position
        values, mask = random_token_batch(rng, integer)
        lam = rng.choice([0.0, 0.25, 0.5, 1.0]) if integer else rng.uniform(0, 1)
        neighbor, edge = rng.choice(["sum", "mean"]), rng.choice(["zero", "replicate"])
        r_token = rng.choice([0.01, 0.1, 0.3, 0.5, 0.7, 0.99, 1.0, rng.uniform(0.01, 1)])
        rows = [rng.random() < 0.7 for _ in values]
        tokppl, response = torch.tensor(values), torch.tensor(mask)
        kept = prune_tokens(
            tokppl, response, r_token, lam=lam, neighbor=neighbor, edge=edge, rows=torch.tensor(rows)
        )
        assert kept.dtype == torch.bool and kept.shape == response.shape
        assert not (kept & ~response).any()
        computed = token_scores(tokppl, response, lam=lam, neighbor=neighbor, edge=edge).tolist()
        for b, (row_values, row_mask) in enumerate(zip(values, mask)):
            kept_positions = {j for j, k in enumerate(kept[b].tolist()) if k}
            if not rows[b]:
                assert kept_positions == {j for j, m in enumerate(row_mask) if m}
                continue
            if integer:
                scores = bf_scores_row(row_values, row_mask, lam, neighbor, edge)
            else:
                # Continuous data: rank the implementation's own scores (checked above).
                scores = {j: computed[b][j] for j, m in enumerate(row_mask) if m}
            assert kept_positions == bf_keep_row(scores, r_token)


def test_neighbour_modes_on_hand_computed_examples():
    # Prompt at 0-1, answer spans at 2-4 and 6-7 (position 5 is a user turn), padding at 8.
    tokppl = torch.tensor([[100.0, 100.0, 2.0, 4.0, 8.0, 100.0, 16.0, 32.0, 0.0]])
    mask = torch.tensor([[False, False, True, True, True, False, True, True, False]])
    inf = math.inf

    def scores(**kwargs):
        return token_scores(tokppl, mask, **kwargs)[0].tolist()

    # Response sequence 2, 4, 8, 16, 32; lam = 0.5: s = 0.5 * own + 0.5 * (prev + next).
    # Ends: 2 has only 4 after it, 32 only 16 before it (the user turn at 5 is skipped).
    assert scores() == [inf, inf, 1 + 2, 2 + 5, 4 + 10, inf, 8 + 20, 16 + 8, inf]
    assert scores(edge="replicate") == [inf, inf, 1 + 3, 7.0, 14.0, inf, 28.0, 16 + 24, inf]
    # mean: 0.5 * own + 0.25 * (prev + next)
    assert scores(neighbor="mean") == [inf, inf, 1 + 1, 2 + 2.5, 4 + 5, inf, 8 + 10, 16 + 4, inf]
    assert scores(neighbor="mean", edge="replicate") == [inf, inf, 1 + 1.5, 4.5, 9.0, inf, 18.0, 16 + 12, inf]
    assert scores(lam=0.0) == [inf, inf, 2.0, 4.0, 8.0, inf, 16.0, 32.0, inf]
    assert scores(lam=1.0) == [inf, inf, 4.0, 10.0, 20.0, inf, 40.0, 16.0, inf]
    # Keep 2 of 5; with lam = 1 only the neighbours count, and the last token (one neighbour, 16)
    # beats the one before it (8 + 32).
    kept = prune_tokens(tokppl, mask, 0.4, lam=1.0)[0].tolist()
    assert kept == [False, False, True, True, False, False, False, False, False]
    kept = prune_tokens(tokppl, mask, 0.6, lam=1.0)[0].tolist()
    assert kept == [False, False, True, True, False, False, False, True, False]


def test_a_spike_takes_its_neighbours_with_it():
    tokppl = torch.tensor([[1.0, 1.0, 1.0, 50.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.ones_like(tokppl, dtype=torch.bool)
    scores = token_scores(tokppl, mask)[0].tolist()
    assert scores == [1.0, 1.5, 26.0, 26.0, 26.0, 1.5, 1.5, 1.0]
    # Keep 4: both ends, then the first two of the tied 1.5s.
    kept = prune_tokens(tokppl, mask, 0.5)[0].tolist()
    assert kept == [True, True, False, False, False, True, False, True]


def test_single_response_token_and_empty_rows():
    tokppl = torch.tensor([[5.0, 3.0, 7.0], [9.0, 9.0, 9.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[False, True, False], [False, False, False], [True, True, True]])
    assert token_scores(tokppl, mask)[0, 1] == 0.5 * 3.0
    assert token_scores(tokppl, mask, edge="replicate")[0, 1] == 0.5 * 3.0 + 0.5 * 6.0
    assert token_scores(tokppl, mask, neighbor="mean", edge="replicate")[0, 1] == 3.0
    assert token_scores(tokppl, mask)[1].tolist() == [math.inf] * 3
    kept = prune_tokens(tokppl, mask, 0.01)
    assert kept.tolist() == [[False, True, False], [False, False, False], [True, False, False]]
    empty = prune_tokens(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), 0.5)
    assert empty.shape == (2, 0)


def test_sample_budget_counts():
    rng = random.Random(22)
    for n in range(1, 40):
        tokppl = torch.tensor([[math.exp(rng.uniform(0, 5)) for _ in range(n)]])
        mask = torch.ones(1, n, dtype=torch.bool)
        for r_token in (0.01, 0.25, 0.29, 0.5, 0.7, 1.0):
            kept = prune_tokens(tokppl, mask, r_token)
            assert int(kept.sum()) == max(1, math.floor(r_token * n + 1e-9))
    mask = torch.ones(1, 100, dtype=torch.bool)
    assert int(prune_tokens(torch.rand(1, 100), mask, 0.29).sum()) == 29


def test_triage_then_prune_tokens():
    rng = random.Random(23)
    saw = {"q2": False, "q4": False, "fallback_q2": False, "fallback_q4": False}
    for n, ratio, ppl, ent in random_cases(seed=24, count=100):
        result = triage(ppl, ent, ratio)
        length = 16
        lengths = [rng.randint(0, length) for _ in range(n)]
        mask = torch.tensor([[j >= length - m for j in range(length)] for m in lengths])
        tokppl = torch.tensor([[math.exp(rng.uniform(0, 4)) for _ in range(length)] for _ in range(n)])
        kept = prune_tokens(tokppl, mask, 0.5, rows=result.prune_tokens)
        for i in result.keep.tolist():
            n_kept, n_response = int(kept[i].sum()), lengths[i]
            if result.prune_tokens[i]:
                assert n_kept == (max(1, n_response // 2) if n_response else 0)
                saw["fallback_q2" if result.fallback[i] else "q2"] = True
            else:
                # Q4 samples, and fallback samples treated as Q4, keep every response token.
                assert n_kept == n_response
                assert torch.equal(kept[i], mask[i])
                saw["fallback_q4" if result.fallback[i] else "q4"] = True
        # The kept sub-batch gives the same mask as the full batch.
        keep = result.keep
        sub = prune_tokens(tokppl[keep], mask[keep], 0.5, rows=result.prune_tokens[keep])
        assert torch.equal(sub, kept[result.keep])
    assert all(saw.values())


def test_batch_budget_hand_example():
    tokppl = torch.tensor([[1.0, 5.0, 2.0, 9.0], [3.0, 3.0, 3.0, 3.0], [7.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor(
        [[True, True, True, True], [False, True, True, True], [True, True, True, False]]
    )
    rows = torch.tensor([True, False, True])
    # lam = 0 scores are the perplexities. 10 response tokens; keep 7 -> remove 3 from the pooled
    # tokens of rows 0 and 2: 9 (row 0), 7 (row 2), 5 (row 0).
    kept = prune_tokens(tokppl, mask, 0.5, lam=0.0, budget="batch", batch_keep=7, rows=rows)
    assert kept.tolist() == [
        [True, False, True, False],
        [False, True, True, True],
        [False, True, True, False],
    ]
    # Ties: equal scores leave later rows and positions first.
    tied = prune_tokens(
        torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.5, lam=0.0, budget="batch", batch_keep=4
    )
    assert tied.tolist() == [[True, True, True], [True, False, False]]
    # The excess (10 - 1 = 9) exceeds the pool (7): the whole pool goes, row 1 keeps its 3 tokens.
    kept = prune_tokens(tokppl, mask, 0.5, budget="batch", batch_keep=1, rows=rows)
    assert kept.tolist() == [[False] * 4, [False, True, True, True], [False] * 4]
    # A budget above the number of response tokens removes nothing.
    assert torch.equal(prune_tokens(tokppl, mask, 0.5, budget="batch", batch_keep=50), mask)


def test_batch_budget_matches_brute_force():
    rng = random.Random(25)
    for _ in range(200):
        values, mask = random_token_batch(rng, integer=rng.random() < 0.5)
        rows = [rng.random() < 0.6 for _ in values]
        total = sum(map(sum, mask))
        batch_keep = rng.randint(0, total + 2)
        lam = rng.choice([0.0, 0.5, 1.0])
        tokppl, response = torch.tensor(values), torch.tensor(mask)
        kept = prune_tokens(
            tokppl, response, 0.5, lam=lam, budget="batch", batch_keep=batch_keep, rows=torch.tensor(rows)
        )
        scores = token_scores(tokppl, response, lam=lam).tolist()
        pool = []
        for b, row_mask in enumerate(mask):
            pool += [(scores[b][j], b, j) for j, m in enumerate(row_mask) if m and rows[b]]
        excess = min(max(total - batch_keep, 0), len(pool))
        removed = {(b, j) for _, b, j in sorted(pool)[len(pool) - excess :]}
        expected = [
            [m and (b, j) not in removed for j, m in enumerate(row_mask)] for b, row_mask in enumerate(mask)
        ]
        assert kept.tolist() == expected
        assert int(kept.sum()) == total - excess


def test_token_perplexity():
    nll = torch.tensor([0.0, 1.0, 50.0, 80.0, 1e9], dtype=torch.float64)
    tokppl = token_perplexity(nll)
    assert tokppl.dtype == torch.float32
    assert tokppl[0] == 1.0 and tokppl[1] == pytest.approx(math.e)
    assert tokppl[2] == tokppl[3] == tokppl[4] == pytest.approx(math.exp(50), rel=1e-6)
    assert torch.isfinite(tokppl).all()
    assert token_perplexity(torch.tensor([[0.5]], dtype=torch.bfloat16)).dtype == torch.float32


def test_stage2_is_deterministic():
    rng = random.Random(26)
    values, mask = random_token_batch(rng, integer=True)
    first = prune_tokens(torch.tensor(values), torch.tensor(mask), 0.5)
    for _ in range(3):
        assert torch.equal(first, prune_tokens(torch.tensor(values), torch.tensor(mask), 0.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(neighbor="avg"), "neighbor must be one of 'sum', 'mean'; got 'avg'"),
        (dict(edge="clamp"), "edge must be one of 'zero', 'replicate'; got 'clamp'"),
        (dict(budget="global"), "budget must be one of 'sample', 'batch'; got 'global'"),
        (dict(lam=1.5), r"lam must be in \[0, 1\]"),
        (dict(lam=-0.1), r"lam must be in \[0, 1\]"),
        (dict(budget="batch"), "budget='batch' needs batch_keep"),
        (dict(budget="batch", batch_keep=-1), "budget='batch' needs batch_keep"),
        (dict(batch_keep=3), "batch_keep only applies to budget='batch'"),
        (dict(rows=torch.tensor([0, 1])), "rows must be a bool tensor of shape"),
        (dict(rows=torch.tensor([True])), "rows must be a bool tensor of shape"),
    ],
)
def test_prune_tokens_rejects_bad_options(kwargs, message):
    tokppl, mask = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        prune_tokens(tokppl, mask, 0.5, **kwargs)


@pytest.mark.parametrize("r_token", [0, 1.01, -1, float("nan")])
def test_prune_tokens_rejects_bad_ratio(r_token):
    with pytest.raises(ValueError, match="r_token"):
        prune_tokens(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), r_token)


def test_stage2_rejects_bad_tensors():
    good = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        token_scores(torch.ones(2, 4), good)
    with pytest.raises(ValueError, match="2-D"):
        token_scores(torch.ones(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="response_mask must be a bool tensor"):
        prune_tokens(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int64), 0.5)
    bad = torch.tensor([[1.0, float("nan"), float("inf")], [1.0, 1.0, 1.0]])
    message = r"tokppl has non-finite values at response positions \(1 NaN and 1 inf\)"
    with pytest.raises(ValueError, match=message):
        prune_tokens(bad, good, 0.5)
    # Outside the response, anything goes.
    mask = torch.tensor([[True, False, False], [True, True, True]])
    assert prune_tokens(bad, mask, 0.5)[0].tolist() == [True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    for n, ratio, ppl, ent in random_cases(seed=30, count=40):
        for reference in (False, True):
            cpu = triage(ppl, ent, ratio, reference=reference)
            gpu = triage(ppl.cuda(), ent.cuda(), ratio, reference=reference)
            assert gpu.keep.is_cuda and gpu.quadrant.is_cuda and gpu.prune_tokens.is_cuda
            assert torch.equal(cpu.keep, gpu.keep.cpu())
            assert torch.equal(cpu.quadrant, gpu.quadrant.cpu())
            assert torch.equal(cpu.prune_tokens, gpu.prune_tokens.cpu()) and cpu.level == gpu.level
    rng = random.Random(31)
    for _ in range(40):
        values, mask = random_token_batch(rng, integer=True)
        tokppl, response = torch.tensor(values), torch.tensor(mask)
        for kwargs in (dict(), dict(budget="batch", batch_keep=3)):
            gpu = prune_tokens(tokppl.cuda(), response.cuda(), 0.5, **kwargs)
            assert gpu.is_cuda
            assert torch.equal(prune_tokens(tokppl, response, 0.5, **kwargs), gpu.cpu())
