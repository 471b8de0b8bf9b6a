"""The hardness selector's scalable parts (sparse TF-IDF, k-means on sparse rows, the sampled
silhouette) against the dense implementation they replaced, kept here as the reference
(`dense_reference_*`, copied from the selector before it was made sparse)."""

import math
import re
from collections import Counter

import torch

from qtune.config import SelectConfig
from qtune.pruning import keep_count
from qtune.scoring import DatasetScores
from qtune.selectors import SELECTORS, SelectorInputs
from qtune.selectors.base import keep_top
from qtune.selectors.hardness import expansion_index, kmeans, silhouette, tfidf
from qtune.testbed import TestbedConfig, make_train_set


# --- the dense reference: the selector's functions before issue 30 (O(N V) memory, O(N^2) silhouette)

def dense_reference_tfidf(texts: list[str]) -> torch.Tensor:
    docs = [Counter(re.findall(r"\w+", t.lower())) for t in texts]
    vocabulary = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    counts = torch.zeros(len(texts), max(len(vocabulary), 1), dtype=torch.float64)
    for row, doc in enumerate(docs):
        for word, n in doc.items():
            counts[row, vocabulary[word]] = n
    df = (counts > 0).sum(0)
    idf = torch.log((1 + len(texts)) / (1 + df)) + 1
    return torch.nn.functional.normalize(counts * idf, dim=1)


def dense_reference_kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100) -> torch.Tensor:
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


def dense_reference_silhouette(points: torch.Tensor, labels: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    k = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, k).to(points.dtype)
    sizes = onehot.sum(0)
    out = torch.empty(points.shape[0], dtype=points.dtype)
    for start in range(0, points.shape[0], chunk):
        rows = slice(start, start + chunk)
        sums = torch.cdist(points[rows], points) @ onehot
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


def dense_reference_choice(pairs, clusters: int, ratio: float, seed: int = 0) -> list[int]:
    """Positions the selector kept before issue 30 (no judge)."""
    instructions, responses = zip(*pairs)
    points = dense_reference_tfidf(list(instructions))
    ehs = (expansion_index(list(instructions), list(responses))
           + (dense_reference_silhouette(points, dense_reference_kmeans(points, clusters, seed=seed)) + 1) / 2) / 2
    return keep_top(ehs.tolist(), keep_count(ratio, len(pairs)), highest=True)


# --- data

def gsm8k_style_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n GSM8K-style (question, answer) pairs of the testbed's generator (clean, noise, near-copies)."""
    return [(r["question"], r["answer"]) for r in make_train_set(TestbedConfig(train_size=n, seed=seed))]


def centroid_silhouette(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A cheap estimate that ignores the members: a and b as distances to the cluster means. The
    sampled estimate's error bound below is chosen so that this one fails it."""
    k = int(labels.max()) + 1
    centres = torch.stack([points[labels == c].mean(0) for c in range(k)])
    d = torch.cdist(points, centres)
    a = d.gather(1, labels[:, None]).squeeze(1)
    d.scatter_(1, labels[:, None], math.inf)
    b = d.min(1).values
    return (b - a) / torch.maximum(a, b)


# --- tests

def test_sparse_tfidf_equals_the_dense_reference():
    texts = ["Red apple, red APPLE!", "red pear", "", "a pear and an apple", "x_1 costs 3 dollars; x_1 costs 4?",
             "red apple", "Über straße straße"]
    rows = tfidf(texts)
    assert rows.layout == torch.sparse_csr and rows.dtype == torch.float64
    # Only the (text, distinct word) entries are stored: memory O(nnz), not O(N V).
    assert rows.values().numel() == sum(len(set(re.findall(r"\w+", t.lower()))) for t in texts) == 18
    reference = dense_reference_tfidf(texts)
    assert rows.shape == reference.shape
    torch.testing.assert_close(rows.to_dense(), reference, rtol=0, atol=1e-15)
    assert tfidf([]).shape == (0, 1) and tfidf(["", ""]).to_dense().eq(0).all()


def test_sparse_kmeans_gives_the_dense_references_labels():
    texts = [q for q, _ in gsm8k_style_pairs(60)]
    points = tfidf(texts)
    dense = dense_reference_tfidf(texts)
    for k in (2, 5, 12):
        for seed in (0, 1, 2):
            expected = dense_reference_kmeans(dense, k, seed=seed)
            assert torch.equal(kmeans(points, k, seed=seed), expected), (k, seed)
            assert torch.equal(kmeans(dense, k, seed=seed), expected), (k, seed)  # dense rows too
    # Duplicates (zero k-means++ weight) and fewer distinct points than clusters: an emptied
    # cluster keeps its centre, as in the reference.
    texts = ["red apple"] * 5 + ["green pear"] * 4 + ["blue plum"]
    assert torch.equal(kmeans(tfidf(texts), 4, seed=3), dense_reference_kmeans(dense_reference_tfidf(texts), 4, seed=3))


def test_silhouette_is_exact_when_the_sample_covers_every_cluster():
    texts = [q for q, _ in gsm8k_style_pairs(200)]
    points = tfidf(texts)
    dense = dense_reference_tfidf(texts)
    labels = kmeans(points, 6, seed=0)
    largest = int(torch.bincount(labels).max())
    exact = dense_reference_silhouette(dense, labels)
    for sample in (None, largest, 10 ** 6):
        torch.testing.assert_close(silhouette(points, labels, sample=sample), exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(silhouette(dense, labels, sample=largest), exact, rtol=0, atol=1e-6)
    # One member fewer than the largest cluster: that cluster is sampled, and the values move.
    assert (silhouette(points, labels, sample=largest - 1) - exact).abs().max() > 1e-6


# Measured on 600 testbed questions in 5 clusters (sizes 27, 59, 114, 177, 223; exact silhouettes
# averaging 0.081), 40 members drawn per cluster (the three largest are sampled), seeds 0 to 29:
# mean absolute error against the exact silhouette 0.0077 to 0.0157 (mean 0.0121; 0.0115, 0.0106,
# 0.0124 for the seeds tested), the largest single error 0.090. The centroid estimate (distances
# to the cluster means instead of mean distances to the members) is off by 0.040 on average, and
# all zeros by 0.081. Bound: 0.025, 1.6 times the worst seed, below the centroid estimate's error.
SAMPLED_MEAN_ABSOLUTE_ERROR = 0.025


def test_sampled_silhouette_is_close_to_the_exact_one():
    texts = [q for q, _ in gsm8k_style_pairs(600)]
    points = tfidf(texts)
    labels = kmeans(points, 5, seed=0)
    assert sorted(torch.bincount(labels).tolist()) == [27, 59, 114, 177, 223]  # three are sampled
    exact = dense_reference_silhouette(dense_reference_tfidf(texts), labels)
    errors = [(silhouette(points, labels, sample=40, seed=seed) - exact).abs().mean() for seed in range(3)]
    assert max(errors) < SAMPLED_MEAN_ABSOLUTE_ERROR, errors
    # The bound tells a sample-based estimate from one that ignores the members.
    assert (centroid_silhouette(points.to_dense(), labels) - exact).abs().mean() > SAMPLED_MEAN_ABSOLUTE_ERROR
    # Seeded: the same draw for the same seed, another for another.
    torch.testing.assert_close(silhouette(points, labels, sample=40, seed=1), silhouette(points, labels, sample=40, seed=1))
    assert not torch.equal(silhouette(points, labels, sample=40, seed=1), silhouette(points, labels, sample=40, seed=2))


def test_the_selector_chooses_what_the_dense_implementation_chose():
    pairs = gsm8k_style_pairs(200, seed=1)
    n = len(pairs)
    scores = DatasetScores(sample_id=list(range(10, 10 + n)), n_response=[3] * n, ppl=None, ent=None,
                           token_nll=None, token_entropy=None, seconds=0.0, tokens=0)
    inputs = SelectorInputs(scores, texts=[" ".join(p) for p in pairs], pairs=pairs, metadata=[{}] * n)
    for clusters, seed in ((8, 0), (20, 3)):
        cfg = SelectConfig(model="m", data="d", out="o", selector="hardness", ratio=0.25, clusters=clusters,
                           seed=seed, silhouette_sample=10 ** 6)
        choice = SELECTORS["hardness"]().choose(cfg, inputs)
        assert choice.kept == [10 + i for i in dense_reference_choice(pairs, clusters, 0.25, seed)]
        assert len(choice.kept) == 50
