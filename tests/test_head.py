"""The output projection applied chunk by chunk (qtune.head): scores, losses and gradients equal
the direct computation from full logits; models whose head cannot be split off fall back."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from qtune.errors import QTuneError
from qtune.head import linear_cross_entropy, resolve_head_impl
from qtune.scoring import IGNORE_INDEX, score_batch
from qtune.step import micro_batch_loss
from test_scoring import random_batch, tiny_llama


def micro_batch(weights: bool = False):
    input_ids, attention_mask, labels = random_batch()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "sample_id": torch.arange(3)}
    if weights:
        batch["loss_weight"] = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) * 2
    return batch


def direct_loss(model, batch, loss_tokens):
    """The textbook loss: float32 cross-entropy of the full logits, summed over labelled positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    if "loss_weight" in batch:
        token_loss = token_loss * batch["loss_weight"][:, 1:]
    return token_loss.sum() / loss_tokens


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- the loss maths


@pytest.mark.parametrize("chunk_tokens", [1, 3, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(chunk_tokens, bias):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=bias).double()
    hidden = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (7,), generator=g)
    weight = torch.rand(7, generator=g, dtype=torch.float64)
    for token_weight in (None, weight):
        ours = linear_cross_entropy(hidden, head, target, token_weight, chunk_tokens=chunk_tokens)
        ours_grads = torch.autograd.grad(3.0 * ours, [hidden, *head.parameters()])
        ce = F.cross_entropy(head(hidden), target, reduction="none")
        direct = ce.sum() if token_weight is None else (ce * token_weight).sum()
        direct_grads = torch.autograd.grad(3.0 * direct, [hidden, *head.parameters()])
        torch.testing.assert_close(ours.double(), direct.double(), rtol=1e-6, atol=1e-6)
        for a, b in zip(ours_grads, direct_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def test_linear_cross_entropy_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    target = torch.tensor([0, 4, 2])
    token_weight = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)

    def loss(hidden, weight, bias):
        head = types.SimpleNamespace(weight=weight, bias=bias)  # what the function reads of a Linear
        return linear_cross_entropy(hidden, head, target, token_weight, chunk_tokens=2).double()

    hidden, weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                            for shape in ((3, 4), (5, 4), (5,)))
    # The loss is computed in float32 (as the model's loss is): tolerances fit float32.
    assert torch.autograd.gradcheck(loss, (hidden, weight, bias), eps=1e-3, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- through a model


@pytest.mark.parametrize("entropy_over", ["response", "attended"])
def test_chunked_scores_equal_logits_scores(entropy_over):
    model = tiny_llama()
    batch = random_batch()
    direct = score_batch(model, *batch, entropy_over=entropy_over, head_impl="logits")
    for chunk_tokens in (1, 7, 500):
        chunked = score_batch(model, *batch, entropy_over=entropy_over, head_impl="chunked", chunk_tokens=chunk_tokens)
        for name in ("nll", "entropy", "ppl", "ent"):
            torch.testing.assert_close(getattr(chunked, name), getattr(direct, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_direct(weights, tied):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    batch = micro_batch(weights)
    reference = copy.deepcopy(model)
    direct = direct_loss(reference, batch, 17)
    direct.backward()
    for impl in ("chunked", "logits"):
        model.zero_grad()
        loss = micro_batch_loss(model, batch, 17, head_impl=impl, chunk_tokens=5)
        loss.backward()
        torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
        ours, theirs = gradients(model), gradients(reference)
        assert ours.keys() == theirs.keys()
        assert tied or "lm_head.weight" in ours
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=f"{impl}: {name}")


def test_chunked_loss_under_bfloat16_matches_direct_within_bfloat16():
    model = tiny_llama(dtype=torch.bfloat16).train()
    batch = micro_batch()
    reference = copy.deepcopy(model)
    direct = direct_loss(reference, batch, 17)
    direct.backward()
    loss = micro_batch_loss(model, batch, 17, head_impl="chunked", chunk_tokens=4)
    loss.backward()
    torch.testing.assert_close(loss, direct, rtol=1e-3, atol=1e-3)
    ours, theirs = gradients(model), gradients(reference)
    for name in theirs:
        torch.testing.assert_close(ours[name].float(), theirs[name].float(), rtol=0.05, atol=1e-3, msg=name)


def test_lora_adapted_body_takes_the_chunked_path_and_agrees():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    assert resolve_head_impl(model, "auto") == "chunked"
    batch = micro_batch()
    losses = []
    for impl in ("chunked", "logits"):
        model.zero_grad()
        loss = micro_batch_loss(model, batch, 17, head_impl=impl)
        loss.backward()
        losses.append((loss.detach(), gradients(model)))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    assert losses[0][1].keys() == losses[1][1].keys() and losses[0][1]
    for name in losses[1][1]:
        torch.testing.assert_close(losses[0][1][name], losses[1][1][name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- fallbacks


def test_lora_adapted_head_falls_back_to_logits_with_one_notice(capsys):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert resolve_head_impl(model, "auto") == "logits"
    assert resolve_head_impl(model, "chunked") == "logits"
    err = capsys.readouterr().err
    assert err.count("notice:") == 1 and "not a plain Linear" in err
    scores = score_batch(model, *random_batch(), head_impl="auto")
    assert torch.isfinite(scores.ppl).all()


class ScaledLogitsLlama(LlamaForCausalLM):
    """A model that changes its logits after the head, as Gemma-2 (soft-capping) or Cohere
    (logit scale) do, without a config attribute that says so."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                              **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_a_model_that_transforms_its_logits_is_detected_and_scored_by_its_own_logits(capsys):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = ScaledLogitsLlama(config).eval()
    batch = random_batch()
    first = score_batch(model, *batch, head_impl="chunked")
    assert "differ from its output projection" in capsys.readouterr().err
    direct = score_batch(model, *batch, head_impl="logits")
    torch.testing.assert_close(first.nll, direct.nll)
    assert resolve_head_impl(model, "auto") == "logits"
    loss = micro_batch_loss(model, micro_batch(), 17, head_impl="auto")
    torch.testing.assert_close(loss, direct_loss(model, micro_batch(), 17), rtol=1e-5, atol=1e-6)


def test_soft_capping_config_is_refused_before_running():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert resolve_head_impl(model, "chunked") == "logits"


def test_liger_where_it_cannot_run_is_a_clear_error_and_auto_is_chunked():
    model = tiny_llama()
    with pytest.raises(QTuneError, match="liger-kernel"):
        resolve_head_impl(model, "liger")
    assert resolve_head_impl(model, "auto") == "chunked"
    with pytest.raises(ValueError, match="head_impl must be"):
        resolve_head_impl(model, "fast")


# ----------------------------------------------------------------------------- CUDA (skipped elsewhere)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_on_cuda_in_bfloat16_each_path_matches_the_logits_path(impl):
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    model = tiny_llama(vocab=5000, dtype=torch.bfloat16).cuda().train()
    batch = {k: v.cuda() for k, v in micro_batch().items()}
    batch["input_ids"] = batch["input_ids"] * 13  # spread over the larger vocabulary
    batch["labels"] = torch.where(batch["labels"] >= 0, batch["input_ids"], batch["labels"])
    reference = copy.deepcopy(model)
    direct = micro_batch_loss(reference, batch, 17, head_impl="logits")
    direct.backward()
    loss = micro_batch_loss(model, batch, 17, head_impl=impl, chunk_tokens=8)
    loss.backward()
    torch.testing.assert_close(loss, direct, rtol=2e-3, atol=2e-3)
    ours, theirs = gradients(model), gradients(reference)
    for name in theirs:
        torch.testing.assert_close(ours[name].float(), theirs[name].float(), rtol=0.05, atol=2e-3, msg=name)
    assert resolve_head_impl(model, impl) == impl and resolve_head_impl(model, "auto") == "chunked"
    scores = score_batch(model.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"], head_impl=impl)
    expected = score_batch(reference.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"],
                           head_impl="logits")
    torch.testing.assert_close(scores.nll, expected.nll, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(scores.entropy, expected.entropy, rtol=1e-2, atol=1e-2)
