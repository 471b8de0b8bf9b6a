"""The `attention` token rule and the last layer's received attention it reads (`qtune.attention`)."""

import torch
from test_baselines import kept_positions, method, scores_for
from test_scorer import batch as scorer_batch
from test_train import make_batch, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)
from transformers import LlamaConfig, LlamaForCausalLM

from qtune.attention import received_attention
from qtune.scorer import Scorer
from qtune.train import read_step_log, run_train


def test_received_attention_by_hand():
    """One head, 3 positions, the last one padding. Query 0 sees only key 0; query 1 gives 0.25 to
    key 0 and 0.75 to key 1. Key 0: (1 + 0.25) / 2 queries; key 1: 0.75 / 1; key 2 (padding): 0."""
    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.1, 0.2, 0.7]]]])
    got = received_attention(probs, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(got, torch.tensor([[0.625, 0.75, 0.0]]))


def test_recomputed_attention_equals_the_eager_models_own():
    """The probabilities recomputed from the captured inputs of the last layer (sdpa model) give the
    same received attention as the weights an eager model returns (grouped heads, padding)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    sdpa = LlamaForCausalLM(config).eval()
    config._attn_implementation = "eager"
    eager = LlamaForCausalLM(config).eval()
    eager.load_state_dict(sdpa.state_dict())
    b = scorer_batch([12, 9, 7])
    scores = Scorer(attention=True)(sdpa, [b])[0]
    with torch.no_grad():
        probs = eager(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True).attentions[-1]
    torch.testing.assert_close(scores.attention, received_attention(probs, b["attention_mask"]), rtol=1e-4, atol=1e-6)


def test_attention_rule_keeps_the_most_attended_tokens():
    batch = make_batch([8])  # response positions 3..7
    scores = scores_for(batch, [[1.0] * 5])
    scores.attention = torch.zeros_like(scores.nll)
    scores.attention[0, 3:8] = torch.tensor([0.1, 0.5, 0.2, 0.5, 0.05])
    decision = method("longest+attention", r_sample=1.0, r_token=0.6).select([batch], [scores], 0)
    assert kept_positions(decision) == [4, 5, 6]  # 0.5, 0.5 (earlier first), then 0.2
    assert method("longest+attention").needs == {"attention"}


def test_attention_rule_trains(tiny_run_inputs, tmp_path):
    run_train(train_config(tiny_run_inputs, tmp_path / "run", method="random+attention", r_token=0.5))
    rows = read_step_log(tmp_path / "run" / "steps.jsonl")
    assert rows and all(0 < r["kept_tokens"] < r["response_tokens"] for r in rows)
