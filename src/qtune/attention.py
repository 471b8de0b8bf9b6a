"""The attention each position receives in a model's last decoder layer, for the `attention` token
rule (a FastV-style rule: answer tokens that later tokens attend to least are pruned).

sdpa and flash-attention do not return attention weights, so the scoring pass does not ask for
them: `capture_last_layer` keeps the inputs of the last layer's self-attention during the pass,
and `attention_probabilities` recomputes that one layer's softmax(q k^T / sqrt(d)) from them, for
Llama-style attention (q/k projections, rotary embeddings, optional q/k norms as in Qwen3,
grouped key/value heads); a sliding window is not applied. `received_attention` is the maths:
for position j, the mean over heads and over the attending positions i >= j (attended ones only)
of p(i -> j).

Memory: the probabilities of one layer, [B, heads, L, L] float32, for the pass.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import QTuneError
from .models import decoder_layers


def received_attention(probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """float32 [B, L]: for each key position j, the mean of probs[b, h, i, j] over heads h and
    over the attended query positions i >= j; 0 at positions no query can see (padding).

    probs: [B, H, L, L] attention probabilities (rows: queries, columns: keys; causal, so zero
    above the diagonal); attention_mask: [B, L], 1 where a position is attended."""
    valid = attention_mask.bool()
    per_key = (probs.float() * valid[:, None, :, None]).sum(dim=(1, 2))  # over heads and queries
    # Queries that can see key j: the attended positions i >= j.
    seeing = valid.flip(1).cumsum(1).flip(1).to(torch.float32) * probs.shape[1]
    return torch.where(valid & (seeing > 0), per_key / seeing.clamp_min(1), 0.0)


@contextlib.contextmanager
def capture_last_layer(model):
    """Inside the block, every forward of `model` leaves the last decoder layer's self-attention
    inputs in the yielded dict ("module", "hidden_states", "position_embeddings")."""
    _, layers = decoder_layers(model, "the attention token rule")
    attention = getattr(layers[-1], "self_attn", None)
    if attention is None or not all(hasattr(attention, a) for a in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise QTuneError("the attention token rule needs Llama-style self-attention (q_proj, k_proj, rotary "
                         f"embeddings) in the last layer; {type(layers[-1]).__name__} has none")
    captured = {"module": attention}

    def keep(module, args, kwargs):
        captured["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["position_embeddings"] = kwargs.get("position_embeddings")

    handle = attention.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def attention_probabilities(captured: dict, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, H, L, L] float32 causal attention probabilities of the captured layer (padding keys
    masked; rows of padding queries all zero)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attention, hidden = captured["module"], captured["hidden_states"]
    batch, length, _ = hidden.shape
    shape = (batch, length, -1, attention.head_dim)
    q = attention.q_proj(hidden).view(shape)
    k = attention.k_proj(hidden).view(shape)
    if getattr(attention, "q_norm", None) is not None:  # Qwen3-style per-head norms before rotary
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if captured["position_embeddings"] is not None:
        q, k = apply_rotary_pos_emb(q, k, *captured["position_embeddings"])
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q.float() @ k.float().transpose(-1, -2)) * attention.scaling
    valid = attention_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
    allowed = causal[None, None] & valid[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(probs * valid[:, None, :, None], nan=0.0)
