"""Token objectives (`qtune.objectives`): values on hand-computed examples, gradients of the chunked
loss against autograd, and a training run with each."""

import math

import pytest
import torch
from test_train import tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)

from qtune.head import linear_cross_entropy
from qtune.objectives import OBJECTIVES, Objective
from qtune.train import read_step_log, run_train

P = torch.tensor([0.9, 0.5, 0.1])  # gold-token probabilities of three tokens


def test_values_on_hand_computed_probabilities():
    logp = P.log()
    expected = {
        ("nll", 1.0): [-math.log(0.9), -math.log(0.5), -math.log(0.1)],
        ("dft", 1.0): [-0.9 * math.log(0.9), -0.5 * math.log(0.5), -0.1 * math.log(0.1)],
        ("prob", 1.0): [0.1, 0.5, 0.9],  # -p as 1 - p
        ("prob", 10.0): [(1 - 0.9 ** 10) / 10, (1 - 0.5 ** 10) / 10, (1 - 0.1 ** 10) / 10],
        ("top_p", 1.0): [0.1, 0.5, 0.0],  # q = 0.5: p >= 0.5 keep (0.5 passes: ties pass)
        ("bottom_p", 1.0): [0.0, 0.5, 0.9],
        ("top_logp", 1.0): [-math.log(0.9), -math.log(0.5), 0.0],
        ("bottom_logp", 1.0): [0.0, -math.log(0.5), -math.log(0.1)],
    }
    assert {name for name, _ in expected} == set(OBJECTIVES)
    for (name, alpha), values in expected.items():
        got = Objective(name, alpha=alpha, threshold=0.5)(logp)
        torch.testing.assert_close(got, torch.tensor(values), msg=name)


def test_weights_are_the_slope_and_prob_tends_to_nll():
    """-f'(l): 1 for NLL, p for DFT, p^a for prob, the indicator for the thresholded -log p."""
    nll = -P.log()
    cases = {"nll": torch.ones(3), "dft": P, "top_logp": torch.tensor([1.0, 1.0, 0.0]),
             "bottom_p": torch.tensor([0.0, 0.5, 0.1])}
    for name, weight in cases.items():
        torch.testing.assert_close(Objective(name)(-nll).detach(), Objective(name).value_and_weight(nll)[0])
        torch.testing.assert_close(Objective(name).value_and_weight(nll)[1], weight, msg=name)
    torch.testing.assert_close(Objective("prob", alpha=3.0).value_and_weight(nll)[1], P ** 3)
    small = Objective("prob", alpha=1e-4)
    torch.testing.assert_close(small(-nll), nll, rtol=1e-3, atol=1e-3)


def test_refuses_what_is_not_an_objective():
    for kwargs, match in (({"name": "mse"}, "unknown objective"), ({"name": "prob", "alpha": 0.0}, "alpha"),
                          ({"name": "top_p", "threshold": 1.5}, "threshold")):
        with pytest.raises(ValueError, match=match):
            Objective(**kwargs)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_chunked_loss_matches_autograd_through_the_logits(name):
    """Value and gradients (hidden states, head weight and bias) of the chunked loss equal autograd
    through the logits, with per-token weights, across several chunks."""
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(6, 7, dtype=torch.float64)
    head.weight.data *= 3  # spread the probabilities over both sides of the threshold
    target = torch.randint(0, 7, (11,))
    weight = torch.rand(11, dtype=torch.float64)
    objective = Objective(name, alpha=2.0, threshold=0.3)

    logp = torch.log_softmax(head(hidden), dim=-1).gather(1, target[:, None]).squeeze(1)
    expected = (objective(logp) * weight).sum()
    expected_grads = torch.autograd.grad(expected, (hidden, head.weight, head.bias))
    got = linear_cross_entropy(hidden, head, target, weight, chunk_tokens=4, objective=objective)
    grads = torch.autograd.grad(got, (hidden, head.weight, head.bias))
    # The chunked loss works in float32 (its logits are float32 whatever the inputs).
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_training_with_an_objective(tiny_run_inputs, tmp_path):
    """--loss reaches the step: the same run with dft trains to other weights than with nll, and
    its logged loss is the DFT value (smaller than NLL's, since p < 1)."""
    nll = run_train(train_config(tiny_run_inputs, tmp_path / "nll", method="qtuning"))
    dft = run_train(train_config(tiny_run_inputs, tmp_path / "dft", method="qtuning", loss="dft"))
    nll_rows, dft_rows = (read_step_log(tmp_path / r / "steps.jsonl") for r in ("nll", "dft"))
    assert dft_rows[0]["kept_ids"] == nll_rows[0]["kept_ids"]  # same scores, same selection at step 1
    assert 0 < dft_rows[0]["loss"] < nll_rows[0]["loss"]
    assert nll["final_loss"] != dft["final_loss"]


@pytest.mark.parametrize("name", ["dft", "top_p"])
def test_logits_path_equals_the_chunked_path(name):
    """A model whose head cannot be split off takes the logits path: same loss and gradients."""
    from test_scorer import batch, llama

    from qtune.step import micro_batch_loss

    micro_batch = batch([12, 9, 7])
    objective = Objective(name, threshold=0.02)
    results = []
    for impl in ("logits", "chunked"):
        model = llama(2)
        loss = micro_batch_loss(model.train(), micro_batch, 20, head_impl=impl, chunk_tokens=5, objective=objective)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
