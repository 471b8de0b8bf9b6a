"""Scoring: chunked float32 statistics equal a direct full-softmax computation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qtune.scoring import IGNORE_INDEX, sample_scores, score_batch, token_statistics


def tiny_llama(vocab=300, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).to(dtype).eval()


def random_batch(vocab=300, batch=3, length=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[0, :8] = IGNORE_INDEX          # prompt
    labels[1, :3] = IGNORE_INDEX
    labels[1, 12:15] = IGNORE_INDEX       # a second prompt between two answer spans
    attention_mask[2, 15:] = 0            # right padding
    labels[2, :5] = IGNORE_INDEX
    labels[2, 15:] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def direct_statistics(logits, labels):
    """The textbook computation: full float32 log-softmax over [B, L, V] at once."""
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    nll = -logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    pad = torch.zeros(labels.shape[0], 1)
    return (torch.cat([pad, nll * mask], 1), torch.cat([pad, entropy * mask], 1),
            torch.cat([pad.bool(), mask], 1))


@pytest.mark.parametrize("chunk_tokens", [1, 5, 128])
def test_chunked_statistics_equal_full_softmax(chunk_tokens):
    model = tiny_llama()
    input_ids, attention_mask, labels = random_batch()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    nll, entropy, mask = token_statistics(logits, labels, chunk_tokens=chunk_tokens)
    ref_nll, ref_entropy, ref_mask = direct_statistics(logits, labels)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    assert nll.dtype == entropy.dtype == torch.float32


def test_score_batch_sample_scores_match_definitions():
    model = tiny_llama()
    input_ids, attention_mask, labels = random_batch()
    scores = score_batch(model, input_ids, attention_mask, labels, chunk_tokens=7)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ref_nll, ref_entropy, mask = direct_statistics(logits, labels)
    n = mask.sum(1)
    torch.testing.assert_close(scores.ppl, torch.exp(ref_nll.sum(1) / n), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.ent, ref_entropy.sum(1) / n, rtol=1e-5, atol=1e-6)
    assert scores.n_response.tolist() == n.tolist()
    # an untrained model over a 300-token vocabulary is close to uniform
    assert torch.all(scores.ent > 5.0) and torch.all(scores.ent <= torch.log(torch.tensor(300.0)) + 1e-4)


def test_bfloat16_model_is_scored_in_float32():
    model = tiny_llama(dtype=torch.bfloat16)
    input_ids, attention_mask, labels = random_batch()
    scores = score_batch(model, input_ids, attention_mask, labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert logits.dtype == torch.bfloat16
    ref_nll, ref_entropy, _ = direct_statistics(logits, labels)
    torch.testing.assert_close(scores.nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    assert scores.ppl.dtype == torch.float32


def test_entropy_over_attended_positions():
    model = tiny_llama()
    input_ids, attention_mask, labels = random_batch()
    scores = score_batch(model, input_ids, attention_mask, labels, entropy_over="attended")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logp = torch.log_softmax(logits.float(), -1)[:, :-1]
    full_entropy = -(logp.exp() * logp).sum(-1)
    attended = attention_mask[:, 1:].bool()
    expected = (full_entropy * attended).sum(1) / attended.sum(1)
    torch.testing.assert_close(scores.ent, expected, rtol=1e-5, atol=1e-6)


def test_sample_without_response_token_is_an_error_not_zero():
    nll = torch.zeros(2, 4)
    mask = torch.tensor([[False, True, True, False], [False, False, False, False]])
    with pytest.raises(ValueError, match="no response token"):
        sample_scores(nll, nll, mask)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        token_statistics(torch.zeros(2, 5, 10), torch.zeros(2, 4, dtype=torch.long))


def test_full_logits_path_equals_logits_to_keep_path(monkeypatch):
    """Models without `logits_to_keep` take the full-logits path; both give the same scores."""
    import qtune.head as head
    import qtune.scoring as scoring

    model = tiny_llama()
    input_ids, attention_mask, labels = random_batch()
    fast = score_batch(model, input_ids, attention_mask, labels, chunk_tokens=4, head_impl="logits")
    monkeypatch.setattr(scoring, "accepts_logits_to_keep", lambda m: False)
    monkeypatch.setattr(head, "accepts_logits_to_keep", lambda m: False)
    slow = score_batch(model, input_ids, attention_mask, labels, chunk_tokens=4)
    for name in ("nll", "entropy", "ppl", "ent"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.response_mask, slow.response_mask)


def test_minus_infinity_logits_give_finite_entropy():
    logits = torch.randn(1, 4, 10)
    logits[..., 7:] = float("-inf")  # a model that masks part of its vocabulary
    labels = torch.tensor([[-100, 1, 2, 3]])
    nll, entropy, _ = token_statistics(logits, labels)
    ref_nll, ref_entropy, _ = direct_statistics(logits[..., :7], labels)
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(entropy, ref_entropy)
