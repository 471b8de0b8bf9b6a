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
here in torch, on sparse rows. Ties: the earlier sample first.

Cost in N (samples), with V the vocabulary, z the mean number of distinct words of an
instruction (nnz = N z), k the clusters, M `--silhouette-sample`, I the Lloyd iterations run
(at most 100):
  - `expansion_index`: O(N) time and memory.
  - `tfidf`: O(N z log(N z)) time (tokenizing, then one sort of the entries), O(N z + V) memory:
    a float64 sparse CSR matrix, no dense [N, V] intermediate.
  - `kmeans`: O(k N z) for the seeding and O(I (k N z + k V)) for Lloyd's iterations; memory
    O(N z + k V) besides a block of at most 2^20 distances ([rows, k]).
  - `silhouette`: O(N m z) time with m <= min(N, k M) the members it compares with (every member
    of clusters of at most M, a seeded sample of M of larger ones), plus O(N) for the draw;
    memory O(m z) for the sampled rows and O(block x m) for a block of distances (2^19 floats).
    Exact when every cluster has at most M members (then m = N <= k M).
  - the choice (`keep_top`): O(N log N).
So for fixed k and M everything is O(N log N) at most.
"""

from __future__ import annotations

import math
import re
import warnings
from array import array
from collections import Counter

import torch

from ..errors import QTuneError
from ..pruning import keep_count, min_max
from .base import StaticChoice, keep_top, register_selector


def expansion_index(instructions: list[str], responses: list[str]) -> torch.Tensor:
    """IREI per sample: mean of the min-max normalised total length and response/instruction ratio."""
    inst = torch.tensor([max(len(t), 1) for t in instructions], dtype=torch.float64)
    resp = torch.tensor([len(t) for t in responses], dtype=torch.float64)
    return (min_max(inst + resp) + min_max(resp / inst)) / 2


_BLOCK = 2 ** 20  # floats of one block of distances (8 MiB of float64): k-means' [rows, k]
_SILHOUETTE_BLOCK = 2 ** 19  # the silhouette's [members, rows] block (4 MiB: small enough to stay in cache)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _row_of_entries(crow: torch.Tensor) -> torch.Tensor:
    """The row of each stored entry of a CSR matrix."""
    return torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())


def _squared_norms(points: torch.Tensor) -> torch.Tensor:
    if points.layout != torch.sparse_csr:
        return (points * points).sum(1)
    values = points.values()
    return torch.zeros(points.shape[0], dtype=values.dtype).index_add_(0, _row_of_entries(points.crow_indices()),
                                                                       values * values)


def _dense_row(points: torch.Tensor, i: int) -> torch.Tensor:
    if points.layout != torch.sparse_csr:
        return points[i]
    crow = points.crow_indices()
    a, b = int(crow[i]), int(crow[i + 1])
    row = torch.zeros(points.shape[1], dtype=points.dtype)
    row[points.col_indices()[a:b]] = points.values()[a:b]
    return row


def _int32_indices(points: torch.Tensor) -> torch.Tensor:
    """The same sparse CSR matrix with int32 indices when they fit (dense points unchanged)."""
    if points.layout != torch.sparse_csr or points.values().numel() >= 2 ** 31:
        return points
    return _csr(points.crow_indices().to(torch.int32), points.col_indices().to(torch.int32), points.values(),
                tuple(points.shape))


def _row_block(points: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1, sparse when the points are."""
    if points.layout != torch.sparse_csr:
        return points[start:stop]
    crow = points.crow_indices()
    a, b = int(crow[start]), int(crow[stop])
    return _csr(crow[start:stop + 1] - a, points.col_indices()[a:b], points.values()[a:b],
                (stop - start, points.shape[1]))


def _take_rows(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows `index` of the points, sparse when the points are."""
    if points.layout != torch.sparse_csr:
        return points[index]
    crow = points.crow_indices()
    starts, lengths = crow[index], crow[index + 1] - crow[index]
    new_crow = torch.zeros(index.numel() + 1, dtype=torch.int64)
    new_crow[1:] = lengths.cumsum(0)
    position = torch.repeat_interleave(starts - new_crow[:-1], lengths) + torch.arange(int(new_crow[-1]))
    return _csr(new_crow, points.col_indices()[position], points.values()[position], (index.numel(), points.shape[1]))


def _tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(values, dtype=dtype).clone() if len(values) else torch.empty(0, dtype=dtype)


def tfidf(texts: list[str]) -> torch.Tensor:
    """Unit-length TF-IDF rows of lower-cased word counts, idf = ln((1 + N) / (1 + df)) + 1, as a
    float64 sparse CSR tensor [N, V] (V the distinct words, columns in sorted word order), built
    entry by entry: memory O(N z), never a dense [N, V]."""
    ids: dict[str, int] = {}  # word -> id in the order first seen
    lengths, cols, counts = array("q"), array("q"), array("d")
    for text in texts:
        doc = Counter(ids.setdefault(w, len(ids)) for w in re.findall(r"\w+", text.lower()))
        lengths.append(len(doc))
        cols.extend(doc.keys())
        counts.extend(doc.values())
    n, width = len(texts), max(len(ids), 1)
    rank = torch.empty(len(ids), dtype=torch.int64)  # first-seen id -> sorted position
    rank[torch.tensor([ids[w] for w in sorted(ids)], dtype=torch.int64)] = torch.arange(len(ids))
    col = rank[_tensor(cols, torch.int64)]
    count = _tensor(counts, torch.float64)
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = _tensor(lengths, torch.int64).cumsum(0)
    rows = _row_of_entries(crow)
    order = (rows * width + col).argsort()  # sorted columns within each row
    col, count = col[order], count[order]
    df = torch.bincount(col, minlength=width)
    idf = torch.log((1 + n) / (1 + df)) + 1  # the same (float32) idf as the dense version had
    values = count * idf[col]
    norms = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, values * values).sqrt()
    return _csr(crow, col, values / norms.clamp_min(1e-12)[rows], (n, width))


def _squared_distances(points: torch.Tensor, squared: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[N, c] squared distances of every point to dense centres [c, V], ||x||^2 + ||c||^2 - 2 x.c."""
    return (squared[:, None] + (centres * centres).sum(1)[None] - 2 * (points @ centres.T)).clamp_min_(0)


def _nearest_centre(points: torch.Tensor, squared: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    rows = max(1, _BLOCK // centres.shape[0])
    centres_t = centres.T.contiguous()
    centre_sq = (centres * centres).sum(1)
    labels = torch.empty(points.shape[0], dtype=torch.int64)
    for start in range(0, points.shape[0], rows):
        stop = min(start + rows, points.shape[0])
        d = squared[start:stop, None] + centre_sq[None] - 2 * (_row_block(points, start, stop) @ centres_t)
        labels[start:stop] = d.clamp_min_(0).argmin(1)
    return labels


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """Cluster labels [N] of Lloyd's k-means with k-means++ seeding (a `seed`ed generator); an
    emptied cluster keeps its centre; stops when no label changes. `points` sparse CSR (as `tfidf`
    gives) or dense; distances ||x||^2 + ||c||^2 - 2 x.c, x.c a sparse-dense product, in blocks of
    rows. O(k N z) for the seeding, O(k N z + k V) per iteration; memory O(k V) for the centres."""
    g = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    squared = _squared_norms(points)
    points = _int32_indices(points)  # the sparse-dense product would convert them at every call
    picks = [int(torch.randint(n, (1,), generator=g))]
    centre = _dense_row(points, picks[0])
    nearest = _squared_distances(points, squared, centre[None]).squeeze(1)
    for _ in range(1, k):
        total = nearest.sum()
        pick = int(torch.multinomial(nearest / total, 1, generator=g)) if total > 0 else int(torch.randint(n, (1,), generator=g))
        picks.append(pick)
        nearest = torch.minimum(nearest, _squared_distances(points, squared, _dense_row(points, pick)[None]).squeeze(1))
    centres = torch.stack([_dense_row(points, i) for i in picks])
    labels = _nearest_centre(points, squared, centres)
    if points.layout == torch.sparse_csr:
        entry_rows, cols, values = _row_of_entries(points.crow_indices()), points.col_indices(), points.values()
    for _ in range(iterations):
        sizes = torch.bincount(labels, minlength=k)
        sums = torch.zeros(k, points.shape[1], dtype=centres.dtype)
        if points.layout == torch.sparse_csr:
            sums.view(-1).index_add_(0, labels[entry_rows] * points.shape[1] + cols, values)
        else:
            sums.index_add_(0, labels, points)
        kept = sizes > 0
        centres[kept] = sums[kept] / sizes[kept, None]
        new = _nearest_centre(points, squared, centres)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _member_matrix(points: torch.Tensor, chosen: torch.Tensor, squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen rows as [-2 x, ||x||^2, 1] (so that their product with a block [y; 1; ||y||^2] is
    the squared distances, as `torch.cdist` does it), and for sparse points the map from a word to
    its column among the words the chosen rows use (-1 for the others): sparse CSR with int32
    indices, which the sparse-dense product takes without a copy."""
    member_sq = squared[chosen]
    if points.layout != torch.sparse_csr:
        rows = points[chosen].to(torch.float64)
        ones = torch.ones_like(member_sq)
        return torch.cat([-2 * rows, member_sq[:, None], ones[:, None]], 1), torch.empty(0)
    rows = _take_rows(points, chosen)
    crow, col, values = rows.crow_indices(), rows.col_indices(), rows.values()
    used = torch.unique(col)
    column = torch.full((points.shape[1],), -1, dtype=torch.int64)
    column[used] = torch.arange(used.numel())
    width, m = used.numel(), chosen.numel()
    new_crow = crow + 2 * torch.arange(m + 1)
    new_col = torch.empty(col.numel() + 2 * m, dtype=torch.int64)
    new_values = torch.empty(col.numel() + 2 * m, dtype=torch.float64)
    at = torch.arange(col.numel()) + 2 * _row_of_entries(crow)
    new_col[at], new_values[at] = column[col], -2 * values.to(torch.float64)
    new_col[new_crow[1:] - 2], new_values[new_crow[1:] - 2] = width, member_sq
    new_col[new_crow[1:] - 1], new_values[new_crow[1:] - 1] = width + 1, 1.0
    return _int32_indices(_csr(new_crow, new_col, new_values, (m, width + 2))), column


def silhouette(points: torch.Tensor, labels: torch.Tensor, *, sample: int | None = None, seed: int = 0) -> torch.Tensor:
    """Silhouette s = (b - a) / max(a, b) per sample (Euclidean), a the mean distance to the other
    members of its cluster, b the smallest mean distance to another cluster; 0 for a sample alone
    in its cluster (Rousseeuw 1987). Exact when `sample` is None or no cluster has more than
    `sample` members; otherwise each larger cluster is represented by a seeded uniform draw of
    `sample` of its members (generator seeded with `seed`), and a and b are the mean distances to
    those (a point drawn into its own cluster's sample is left out of a's mean).

    `points` sparse CSR (as `tfidf` gives) or dense. The m compared members (m <= k x sample, or N
    when exact) are held as sparse rows; a block of points is densified on the members' words
    only, and the squared distances to the members are one sparse-dense product. Time O(N m z) (z
    the words of a row), O(N^2 z) when exact; memory O(m z) for the members and O(block x m) for
    a block of distances, a block being 2^19 floats (4 MiB)."""
    n = points.shape[0]
    k = int(labels.max()) + 1
    sizes = torch.bincount(labels, minlength=k)
    by_cluster = torch.argsort(labels, stable=True)
    ends = sizes.cumsum(0).tolist()
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, end in enumerate(ends):
        members = by_cluster[end - int(sizes[c]):end]
        if sample is not None and members.numel() > sample:
            members = members[torch.randperm(members.numel(), generator=g)[:sample]].sort().values
        chosen.append(members)
    chosen = torch.cat(chosen)  # in cluster order
    m_sizes = torch.bincount(labels[chosen], minlength=k)
    counts = m_sizes.to(torch.float64)
    position = torch.full((n,), -1, dtype=torch.int64)  # where each point is among the members, -1 if not
    position[chosen] = torch.arange(chosen.numel())
    squared = _squared_norms(points).to(torch.float64)
    members, column = _member_matrix(points, chosen, squared)
    width = members.shape[1] - 2
    if points.layout == torch.sparse_csr:
        crow, cols, values = points.crow_indices(), column[points.col_indices()], points.values()
        entry_rows = _row_of_entries(crow)
    rows = max(1, min(_SILHOUETTE_BLOCK // chosen.numel(), _SILHOUETTE_BLOCK // (width + 2)))
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = torch.zeros(width + 2, stop - start, dtype=torch.float64)  # [y; 1; ||y||^2] per point
        if points.layout == torch.sparse_csr:
            first, last = int(crow[start]), int(crow[stop])
            hit = cols[first:last] >= 0  # only the members' words matter
            block[cols[first:last][hit], entry_rows[first:last][hit] - start] = values[first:last][hit].to(torch.float64)
        else:
            block[:width] = points[start:stop].T
        block[width] = 1.0
        block[width + 1] = squared[start:stop]
        distance = (members @ block).clamp_min_(0).sqrt_()  # [m, rows]
        here = position[start:stop]
        drawn = here >= 0  # the point is among its cluster's members: its distance to itself is 0
        distance[here[drawn], torch.arange(stop - start)[drawn]] = 0
        sums = torch.segment_reduce(distance, "sum", lengths=m_sizes, axis=0).T  # [rows, k]: to each cluster
        own = labels[start:stop]
        a = sums.gather(1, own[:, None]).squeeze(1) / (counts[own] - drawn.to(torch.float64)).clamp_min(1)
        means = sums / counts.clamp_min(1)
        means.scatter_(1, own[:, None], math.inf)
        means[:, counts == 0] = math.inf
        b = means.min(1).values
        s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
        out[start:stop] = torch.where((sizes[own] > 1) & torch.isfinite(b), s, torch.zeros_like(s))
    return out


def quality_values(metadata: list[dict], field: str, sample_ids: list[int]) -> list[float]:
    """`metadata[field]` of every sample as a number; QTuneError when a record has none."""
    values = [m.get(field) for m in metadata]
    missing = [i for i, v in enumerate(values) if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if missing:
        raise QTuneError(f"--judge-field {field!r}: {len(missing)} records have no number in metadata[{field!r}] "
                         f"(the first is sample {sample_ids[missing[0]]})")
    return [float(v) for v in values]


@register_selector("hardness")
class HardnessSelector:
    """keep_count(ratio, N) samples of highest extrinsic hardness (THTB's EHS: expansion index and TF-IDF silhouette)"""

    needs = frozenset({"texts"})

    def choose(self, cfg, inputs) -> StaticChoice:
        scores, n = inputs.scores, len(inputs.texts)
        instructions, responses = zip(*inputs.pairs)
        k = min(cfg.clusters, n)
        points = tfidf(list(instructions))
        labels = kmeans(points, k, seed=cfg.seed)
        ehs = (expansion_index(list(instructions), list(responses))
               + (silhouette(points, labels, sample=cfg.silhouette_sample, seed=cfg.seed) + 1) / 2) / 2
        allowed = None
        stats = {"clusters": k}
        if cfg.judge_field:
            judged = quality_values(inputs.metadata, cfg.judge_field, scores.sample_id)
            passed = keep_top(judged, keep_count(cfg.judge_keep, n), highest=True)
            allowed = [False] * n
            for i in passed:
                allowed[i] = True
            stats["passed_judge"] = len(passed)
        values = ehs.tolist()
        positions = keep_top(values, keep_count(cfg.ratio, n), highest=True, allowed=allowed)
        return StaticChoice([scores.sample_id[i] for i in positions], values, "highest extrinsic hardness", stats)
