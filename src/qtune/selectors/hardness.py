"""The `hardness` selector: THTB's extrinsic hardness without external judges. Each sample gets
EHS = the mean of
  - IREI, the instruction-response expansion index: the min-max normalised total length (characters
    of instruction and response) averaged with the min-max normalised response/instruction length
    ratio (long answers to short questions score high);
  - the silhouette of its instruction among k-means clusters of TF-IDF vectors of the instructions,
    mapped from [-1, 1] to [0, 1] (an instruction far from the others of its cluster, near another
    cluster, scores low: it is atypical; a high score is a well-separated, typical one);
and keep_count(ratio, N) samples of highest EHS are kept. With `--judge-field NAME`, a score the
user already has (a reward model's, a local judge's), read from each record's `metadata[NAME]`,
first keeps the `judge_keep` share of highest scores, as THTB's quality stage does with its reward
model; the ratio then applies to the whole dataset.

Citation: "The Harder The Better" (THTB), arXiv 2510.13892: its third stage (extrinsic hardness);
the intrinsic stage needs an LLM judge (Bloom level, disciplines) and is not reproduced. TF-IDF
(smoothed idf, unit rows), k-means (k-means++ seeding, `--seed`) and the silhouette are computed
here in torch; the silhouette needs every pairwise distance, O(N^2) time, in chunks of rows.
Ties: the earlier sample first.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from ..errors import QTuneError
from ..pruning import keep_count
from .base import StaticChoice, keep_top, register_selector


def _min_max(values: torch.Tensor) -> torch.Tensor:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def expansion_index(instructions: list[str], responses: list[str]) -> torch.Tensor:
    """IREI per sample: mean of the min-max normalised total length and response/instruction ratio."""
    inst = torch.tensor([max(len(t), 1) for t in instructions], dtype=torch.float64)
    resp = torch.tensor([len(t) for t in responses], dtype=torch.float64)
    return (_min_max(inst + resp) + _min_max(resp / inst)) / 2


def tfidf(texts: list[str]) -> torch.Tensor:
    """Unit-length TF-IDF rows [N, V] of lower-cased word counts, idf = ln((1 + N) / (1 + df)) + 1."""
    docs = [Counter(re.findall(r"\w+", t.lower())) for t in texts]
    vocabulary = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    counts = torch.zeros(len(texts), max(len(vocabulary), 1), dtype=torch.float64)
    for row, doc in enumerate(docs):
        for word, n in doc.items():
            counts[row, vocabulary[word]] = n
    df = (counts > 0).sum(0)
    idf = torch.log((1 + len(texts)) / (1 + df)) + 1
    return torch.nn.functional.normalize(counts * idf, dim=1)


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """Cluster labels [N] of Lloyd's k-means with k-means++ seeding (a `seed`ed generator); an
    emptied cluster keeps its centre."""
    g = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    centres = [points[int(torch.randint(n, (1,), generator=g))]]
    nearest = torch.cdist(points, centres[0][None]).squeeze(1) ** 2
    for _ in range(1, k):
        total = nearest.sum()
        pick = int(torch.multinomial(nearest / total, 1, generator=g)) if total > 0 else int(torch.randint(n, (1,), generator=g))
        centres.append(points[pick])
        nearest = torch.minimum(nearest, torch.cdist(points, points[pick][None]).squeeze(1) ** 2)
    centres = torch.stack(centres)
    labels = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        for c in range(k):
            members = labels == c
            if members.any():
                centres[c] = points[members].mean(0)
        new = torch.cdist(points, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def silhouette(points: torch.Tensor, labels: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """Silhouette s = (b - a) / max(a, b) per sample (Euclidean), a the mean distance to the other
    members of its cluster, b the smallest mean distance to another cluster; 0 for a sample alone
    in its cluster (Rousseeuw 1987)."""
    k = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, k).to(points.dtype)  # [N, k]
    sizes = onehot.sum(0)
    out = torch.empty(points.shape[0], dtype=points.dtype)
    for start in range(0, points.shape[0], chunk):
        rows = slice(start, start + chunk)
        sums = torch.cdist(points[rows], points) @ onehot  # [n, k]: summed distance to each cluster
        own = labels[rows]
        own_size = sizes[own]
        a = sums.gather(1, own[:, None]).squeeze(1) / (own_size - 1).clamp_min(1)
        means = sums / sizes.clamp_min(1)
        means.scatter_(1, own[:, None], math.inf)
        means[:, sizes == 0] = math.inf
        b = means.min(1).values
        s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
        out[rows] = torch.where((own_size > 1) & torch.isfinite(b), s, torch.zeros_like(s))
    return out


@register_selector("hardness")
class HardnessSelector:
    """keep_count(ratio, N) samples of highest extrinsic hardness (THTB's EHS: expansion index and TF-IDF silhouette)"""

    needs = frozenset({"texts"})

    def choose(self, cfg, inputs) -> StaticChoice:
        scores, n = inputs.scores, len(inputs.texts)
        instructions, responses = zip(*inputs.pairs)
        k = min(cfg.clusters, n)
        points = tfidf(list(instructions))
        ehs = (expansion_index(list(instructions), list(responses))
               + (silhouette(points, kmeans(points, k, seed=cfg.seed)) + 1) / 2) / 2
        allowed = None
        stats = {"clusters": k}
        if cfg.judge_field:
            judged = [m.get(cfg.judge_field) for m in inputs.metadata]
            missing = [i for i, v in enumerate(judged) if not isinstance(v, (int, float)) or isinstance(v, bool)]
            if missing:
                raise QTuneError(f"--judge-field {cfg.judge_field!r}: {len(missing)} records have no number in "
                                 f"metadata[{cfg.judge_field!r}] (the first is sample {scores.sample_id[missing[0]]})")
            passed = keep_top([float(v) for v in judged], keep_count(cfg.judge_keep, n), highest=True)
            allowed = [False] * n
            for i in passed:
                allowed[i] = True
            stats["passed_judge"] = len(passed)
        values = ehs.tolist()
        positions = keep_top(values, keep_count(cfg.ratio, n), highest=True, allowed=allowed)
        return StaticChoice([scores.sample_id[i] for i in positions], values, "highest extrinsic hardness", stats)
