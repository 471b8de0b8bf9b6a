"""Token objectives (`qtune.objectives`): values on hand-computed examples, gradients of the chunked
loss against autograd, and a training run with each."""

import math

import pytest
import torch
from test_train import tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)

from qtune.head import linear_cross_entropy
from qtune.objectives import GOLD_OBJECTIVES, OBJECTIVES, Objective
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
    assert {name for name, _ in expected} == set(GOLD_OBJECTIVES)
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
                          ({"name": "top_p", "threshold": 1.5}, "threshold"), ({"name": "psft", "clip": 0.0}, "clip"),
                          ({"name": "eaft", "top_k": 1}, "top_k"), ({"name": "psft", "window": 0}, "window")):
        with pytest.raises(ValueError, match=match):
            Objective(**kwargs)
    with pytest.raises(ValueError, match="not a function of the gold token"):
        Objective("asft")(P.log())


@pytest.mark.parametrize("name", GOLD_OBJECTIVES)
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


# --- the objectives that need more than the gold token's probability -----------------------------

EPS = 0.28


def materialised(name, logits, target, weight, ref_logits, objective):
    """The objective's summed loss by autograd through materialised float64 logits [n, V]: EAFT as the
    normalised top-K entropy (detached) times NLL, PSFT as PPO's clipped objective literally, ASFT as
    DFT plus lambda x F.kl_div from the reference's softmax."""
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, target[:, None]).squeeze(1)
    if name == "eaft":
        top = torch.softmax(logits.detach().topk(objective.top_k, dim=-1).values, dim=-1)
        entropy = -(top * top.log()).sum(-1) / math.log(objective.top_k)
        token = -(entropy ** objective.alpha) * logp
    elif name == "psft":
        ratio = torch.exp(logp - torch.log_softmax(ref_logits, dim=-1).gather(1, target[:, None]).squeeze(1))
        token = -torch.minimum(ratio, ratio.clamp(1 - objective.clip, 1 + objective.clip))
    else:
        kl = torch.nn.functional.kl_div(logp_all, torch.softmax(ref_logits, dim=-1), reduction="none").sum(-1)
        token = -logp.detach().exp() * logp + objective.kl_weight * kl
    return (token * weight).sum()


def policies(seed=0, n=11, d=6, vocab=9):
    torch.manual_seed(seed)
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(d, vocab, dtype=torch.float64)
    head.weight.data *= 2
    ref_hidden = hidden.detach() + 0.5 * torch.randn(n, d, dtype=torch.float64)
    ref_head = torch.nn.Linear(d, vocab, dtype=torch.float64)
    ref_head.load_state_dict(head.state_dict())
    ref_head.weight.data += 0.7 * torch.randn(vocab, d, dtype=torch.float64)
    target = torch.randint(0, vocab, (n,))
    weight = torch.rand(n, dtype=torch.float64) + 0.5
    return hidden, head, ref_hidden, ref_head, target, weight


@pytest.mark.parametrize("name", ["eaft", "psft", "asft"])
def test_objectives_beyond_the_gold_token_match_autograd_through_the_logits(name):
    """Value and gradients with respect to the hidden states, the head's weight and bias (chunked path,
    3 chunks) and to the logits (logits path) equal autograd through the materialised logits, with
    per-token weights; PSFT's ratios fall on both sides of the clip."""
    from qtune.step import chunked_objective_loss, logits_objective_loss

    hidden, head, ref_hidden, ref_head, target, weight = policies()
    objective = Objective(name, alpha=2.0, clip=EPS, kl_weight=0.3, top_k=4)
    with torch.no_grad():
        ref_logits = ref_head(ref_hidden)
    logits = head(hidden)
    if name == "psft":
        ratio = torch.exp(torch.log_softmax(logits, -1) - torch.log_softmax(ref_logits, -1)).gather(1, target[:, None])
        assert (ratio > 1 + EPS).any() and (ratio < 1 - EPS).any() and ((ratio - 1).abs() < EPS).any()
    expected = materialised(name, logits, target, weight, ref_logits, objective)
    parameters = (hidden, head.weight, head.bias)
    expected_grads = torch.autograd.grad(expected, parameters, retain_graph=True)
    got = chunked_objective_loss(hidden, head, target, weight, objective, (ref_hidden, ref_head), chunk_tokens=4)
    grads = torch.autograd.grad(got, parameters)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)

    leaf = logits.detach().requires_grad_()
    expected_logits_grad = torch.autograd.grad(materialised(name, leaf, target, weight, ref_logits, objective), leaf)
    loss = logits_objective_loss(leaf, target, weight, objective, ref_logits)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], expected_logits_grad[0], rtol=1e-5, atol=1e-6)


def test_entropy_and_ratio_weights_on_hand_computed_values():
    from qtune.objectives import entropy_weights, proximal_value_and_weight

    # Top 2 of [0, 0, -inf]: uniform over two, normalised entropy 1; of [log 3, 0, 0]: (3/4, 1/4).
    logits = torch.tensor([[0.0, 0.0, -math.inf], [math.log(3.0), 0.0, 0.0]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    torch.testing.assert_close(entropy_weights(logits, 2, 1.0), torch.tensor([1.0, h]))
    torch.testing.assert_close(entropy_weights(logits, 2, 3.0), torch.tensor([1.0, h ** 3]))
    logp, old = torch.tensor([0.5, 1.5, 1.0]).log(), torch.tensor([1.0, 1.0, 0.5]).log()
    value, slope = proximal_value_and_weight(logp, old, 0.2)  # ratios 0.5, 1.5 (clipped), 2 (clipped)
    torch.testing.assert_close(value, torch.tensor([-0.5, -1.2, -1.2]))
    torch.testing.assert_close(slope, torch.tensor([0.5, 0.0, 0.0]))


def test_logits_path_equals_the_chunked_path_with_a_reference_policy():
    """micro_batch_loss on a model: ASFT against a frozen base model, PSFT against its old policy after
    the weights moved, EAFT; the logits path and the chunked path give the same loss and gradients."""
    from test_scorer import batch, llama

    from qtune.reference_policy import BasePolicy, OldPolicy
    from qtune.step import micro_batch_loss

    micro_batch = batch([12, 9, 7])
    for name in ("asft", "psft", "eaft"):
        results = []
        for impl in ("logits", "chunked"):
            model = llama(2).train()
            reference = BasePolicy(llama(2, seed=3)) if name == "asft" else OldPolicy(window=4)
            reference.begin_step(model, 0)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            loss = micro_batch_loss(model, micro_batch, 20, head_impl=impl, chunk_tokens=5,
                                    objective=Objective(name, top_k=5), reference=reference)
            loss.backward()
            results.append((loss.detach(), [p.grad for p in model.parameters()]))
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_a, loss_b, msg=name)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reference_policies_run_the_base_and_the_old_weights():
    """OldPolicy swaps in the weights of its window's first step and puts the current ones back;
    BasePolicy on a LoRA model disables the adapters (the base model's logits, no copy)."""
    from peft import LoraConfig, get_peft_model
    from test_scorer import batch, llama

    from qtune.reference_policy import BasePolicy, OldPolicy

    b = batch([12, 9])
    model = llama(2).train()
    before = model(input_ids=b["input_ids"]).logits.detach()
    old = OldPolicy(window=2)
    old.begin_step(model, 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    moved = model(input_ids=b["input_ids"]).logits.detach()
    old.begin_step(model, 1)  # inside the window: the copy stays that of step 0
    with torch.no_grad(), old.applied(model) as policy:
        torch.testing.assert_close(policy(input_ids=b["input_ids"]).logits, before)
        assert not policy.training
    assert model.training
    torch.testing.assert_close(model(input_ids=b["input_ids"]).logits.detach(), moved)
    old.begin_step(model, 2)  # a new window: the current weights
    with torch.no_grad(), old.applied(model) as policy:
        torch.testing.assert_close(policy(input_ids=b["input_ids"]).logits, moved)

    base = llama(2)
    expected = base(input_ids=b["input_ids"]).logits.detach()
    adapted = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert not torch.allclose(adapted(input_ids=b["input_ids"]).logits, expected)
    with torch.no_grad(), BasePolicy().applied(adapted) as policy:
        torch.testing.assert_close(policy(input_ids=b["input_ids"]).logits, expected)


def test_training_with_the_objectives_beyond_the_gold_token(tiny_run_inputs, tmp_path):
    """The run's first step: ASFT's KL is 0 (the base model is the model: a frozen copy without LoRA, the
    adapters disabled with it), so its loss is DFT's; PSFT's ratio is 1, so its loss is -1, again at
    the first step of each window (window 2: steps 1 and 3), not at step 2; EAFT's weights are at
    most 1, so its loss is below NLL's."""
    rows = {}
    for loss, lora_r in (("nll", 0), ("dft", 0), ("asft", 0), ("psft", 0), ("eaft", 0), ("dft", 4), ("asft", 4)):
        out = tmp_path / f"{loss}-{lora_r}"
        run_train(train_config(tiny_run_inputs, out, method="random", max_steps=3, lora_r=lora_r, lr=1e-2, loss=loss,
                               loss_window=2, loss_kl_weight=1.0))
        rows[loss, lora_r] = [r["loss"] for r in read_step_log(out / "steps.jsonl")]
    for lora_r in (0, 4):
        asft, dft = rows["asft", lora_r], rows["dft", lora_r]
        assert asft[0] == pytest.approx(dft[0], rel=1e-6) and asft[1] != pytest.approx(dft[1], rel=1e-6)
    psft = rows["psft", 0]
    assert psft[0] == pytest.approx(-1.0) and psft[2] == pytest.approx(-1.0) and psft[1] != pytest.approx(-1.0)
    assert 0 < rows["eaft", 0][0] < rows["nll", 0][0]
