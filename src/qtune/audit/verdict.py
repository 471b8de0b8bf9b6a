"""The audit's verdict: does a method drop a planted kind more often than untouched records, as
often (within sampling error, as random would), or less often? And its plain sentence.

The rule (docs/audit.md, "The verdict rule"). For a kind, d = (its drop share) - (the untouched
records' drop share under the same method). Each share gets its Wilson score interval at 95%
(Wilson 1927); d's interval is Newcombe's hybrid score interval (Newcombe 1998, method 10):

    lo = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)      hi = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)

with p1 in [l1, u1] the kind's share and p2 in [l2, u2] the untouched share. lo > 0: "more"
(the method catches the kind); hi < 0: "less" (it keeps the kind preferentially: worse than
random); otherwise "same": no difference that the counts can show, which is what a random rule
gets (it drops every record alike). A kind with no record gets "none". Each interval misses its
true value about 5% of the time, so across six kinds a random method shows a "more" or "less"
somewhere in about a quarter of audits: read a single borderline verdict with that in mind, and
plant more (--sample, --plant) to narrow the intervals.

The same rule compares, for a token rule, the pruned share of the planted (corrupted) tokens with
that of the other tokens of the same answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The two-sided 95% normal quantile.
Z95 = 1.959963984540054
#: How the sentences name each planted kind.
KIND_WORDS = {"swapped": "swapped answers", "corrupted": "corrupted answers", "truncated": "truncated answers",
              "off_task": "off-task answers", "duplicate_exact": "exact duplicates",
              "duplicate_near": "near duplicates", "unplanted_defective": "the data's own labelled defects"}


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a share k/n (n >= 1)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval of k1/n1 - k2/n2 (both n >= 1)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


@dataclass
class Verdict:
    """One kind under one method: `hits` of `n` records dropped (or tokens pruned), its share,
    the reference's share, the interval of their difference and the verdict: "more", "same",
    "less" or "none" (no record of the kind)."""

    hits: int
    n: int
    share: float | None
    reference: float
    interval: tuple[float, float] | None
    verdict: str

    @property
    def ratio(self) -> float | None:
        """share / reference share (None when either is missing or the reference is 0)."""
        return None if self.share is None or self.reference == 0 else self.share / self.reference


def judge(hits: int, n: int, ref_hits: int, ref_n: int) -> Verdict:
    """The verdict of `hits` of `n` against the reference's `ref_hits` of `ref_n` (see the module doc)."""
    reference = ref_hits / ref_n if ref_n else 0.0
    if n == 0 or ref_n == 0:
        return Verdict(hits, n, hits / n if n else None, reference, None, "none")
    lo, hi = difference_interval(hits, n, ref_hits, ref_n)
    verdict = "more" if lo > 0 else "less" if hi < 0 else "same"
    return Verdict(hits, n, hits / n, reference, (lo, hi), verdict)


def sentence(verdicts: dict[str, Verdict], *, acts: str = "drops", of_reference: str = "untouched records",
             words: dict[str, str] = KIND_WORDS) -> str:
    """One plain sentence for a method, e.g. "drops swapped answers 3.1x as often as untouched
    records (92% vs 30%); truncated answers at random's rate (as often as untouched records, within
    sampling error)"."""
    parts = []
    for kind, v in verdicts.items():
        if v.verdict != "more":
            continue
        if v.reference == 0:
            parts.append(f"{acts} {v.share:.0%} of {words.get(kind, kind)} and none of the {of_reference}")
        else:
            parts.append(f"{acts} {words.get(kind, kind)} {v.ratio:.1f}x as often as {of_reference} "
                         f"({v.share:.0%} vs {v.reference:.0%})")
    same = [words.get(k, k) for k, v in verdicts.items() if v.verdict == "same"]
    if same:
        parts.append(f"{_listed(same)} at random's rate (as often as {of_reference}, within sampling error)")
    for kind, v in verdicts.items():
        if v.verdict == "less" and v.hits == 0:
            parts.append(f"{acts} none of the {words.get(kind, kind)} (against {v.reference:.0%} of {of_reference}): "
                         "worse than random")
        elif v.verdict == "less":
            parts.append(f"{acts} {words.get(kind, kind)} only {v.ratio:.2f}x as often as {of_reference} "
                         f"({v.share:.0%} vs {v.reference:.0%}): worse than random")
    text = "; ".join(parts) if parts else "nothing to judge (no planted record)"
    return text[0].upper() + text[1:] + "."


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def summarize(counts: dict[str, tuple[int, int]], kinds, reference: str, *, share_key: str = "drop_share",
              acts: str = "drops", of_reference: str = "untouched records", words: dict[str, str] = KIND_WORDS) -> dict:
    """A method's entry of audit.json from its (hits, n) per group (`counts`, the reference group
    and the judged `kinds` among them): per group its share (None when n is 0), n and hits; per
    judged kind the interval of the difference with the reference, the verdict; and the sentence."""
    verdicts = {kind: judge(*counts.get(kind, (0, 0)), *counts.get(reference, (0, 0))) for kind in kinds}
    return {
        share_key: {g: (hits / n if n else None) for g, (hits, n) in counts.items()},
        "n": {g: n for g, (_, n) in counts.items()},
        "hits": {g: hits for g, (hits, _) in counts.items()},
        "interval": {k: v.interval for k, v in verdicts.items()},
        "verdict": {k: v.verdict for k, v in verdicts.items()},
        "sentence": sentence(verdicts, acts=acts, of_reference=of_reference, words=words),
    }
