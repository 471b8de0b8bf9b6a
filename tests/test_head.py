"""The output projection applied a block at a time (qtune.head): the block's size rule on
hand-made shapes; scores, losses and gradients equal the direct computation from full logits at
any block size, whole or sharded (FSDP2, DeepSpeed ZeRO-3: 2 processes over gloo); scoring's
memory under FSDP2 stays flat in the vocabulary; models whose head cannot be split off fall back."""

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import qtune.head
from qtune.errors import QTuneError
from qtune.head import MIN_BLOCK_ELEMENTS, linear_cross_entropy, resolve_head_impl, working_block
from qtune.scoring import IGNORE_INDEX, chunked_token_statistics, score_batch
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


# ----------------------------------------------------------------------------- the block's size


def test_working_block_follows_the_hidden_states_not_the_vocabulary():
    # 2,048 positions x hidden 256 are 524,288 elements, under the 2**21 floor: the budget is 2**21.
    # 800 entries: 2**21 // 800 = 2,621 rows, down to a power of two: 2,048 (all of them).
    assert working_block(2048, 256, 800) == (2048, 800)
    # 152k entries: 13 rows, down to 8, raised to the 128-row minimum. The loss takes whole rows;
    # scoring splits the vocabulary into 2**21 // 128 = 16,384 columns.
    assert working_block(2048, 256, 151936) == (128, 151936)
    assert working_block(2048, 256, 151936, split_vocabulary=True) == (128, 16384)
    # Hidden states above the floor set the budget (Liger's rule): 16,384 x 4,096 = 2**26 elements;
    # 2**26 // 128,256 = 523 -> 512 rows; 2**26 // 32,000 = 2,097 -> 2,048 rows (Liger: 2,048 too).
    assert working_block(16384, 4096, 128256, split_vocabulary=True) == (512, 128256)
    assert working_block(16384, 4096, 32000) == (2048, 32000)
    # Fewer positions than the minimum: all of them; 40 x 32,000 fits the budget, 40 x 151,936 does
    # not: 2**21 // 40 = 52,428 -> 32,768 columns.
    assert working_block(40, 32, 32000, split_vocabulary=True) == (40, 32000)
    assert working_block(40, 32, 151936, split_vocabulary=True) == (40, 32768)
    assert working_block(0, 256, 800) == (1, 800)
    # An explicit chunk_tokens: that many rows (at most all) of the whole vocabulary.
    assert working_block(2048, 256, 151936, 128, split_vocabulary=True) == (128, 151936)
    assert working_block(2048, 256, 151936, 5000) == (2048, 151936)


def direct_statistics(hidden, head, gold):
    """Float64 NLL of `gold` and entropy of the softmax of the full logits."""
    logp = torch.log_softmax(F.linear(hidden.double(), head.weight.double(), head.bias.double()), dim=-1)
    entropy = -(logp.exp() * logp).nan_to_num().sum(-1)  # p log p = 0 where p = 0 (masked entries)
    return -logp.gather(1, gold[:, None]).squeeze(1), entropy


@pytest.mark.parametrize("chunk_tokens", [None, 1, 3, 100])
def test_statistics_over_blocks_of_columns_equal_the_full_softmax(monkeypatch, chunk_tokens):
    # A 64-element budget splits the 50 entries into 7 blocks of 8 columns (the last of 2) for 7
    # positions; logits large enough that the running maximum moves between blocks; a masked
    # vocabulary (-inf): entries 10-19 and the whole fourth block (24-31).
    monkeypatch.setattr(qtune.head, "MIN_BLOCK_ELEMENTS", 64)
    assert working_block(7, 4, 50, split_vocabulary=True) == (7, 8)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(4, 50)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 4, generator=g) * 8)
        head.bias[10:20] = float("-inf")
        head.bias[24:32] = float("-inf")
    hidden = torch.randn(7, 4, generator=g)
    gold = torch.tensor([0, 7, 8, 33, 47, 48, 49])  # first and last columns of blocks, the last block
    nll, entropy = chunked_token_statistics(hidden, head, gold, chunk_tokens=chunk_tokens)
    expected_nll, expected_entropy = direct_statistics(hidden, head, gold)
    torch.testing.assert_close(nll.double(), expected_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the loss maths


@pytest.mark.parametrize("chunk_tokens", [1, 3, None, 1000])
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
@pytest.mark.parametrize("split", [False, True])
def test_chunked_scores_equal_logits_scores(monkeypatch, entropy_over, split):
    if split:  # blocks of columns: 2**9 elements over up to 128 rows
        monkeypatch.setattr(qtune.head, "MIN_BLOCK_ELEMENTS", 512)
    model = tiny_llama()
    batch = random_batch()
    direct = score_batch(model, *batch, entropy_over=entropy_over, head_impl="logits")
    for chunk_tokens in (1, 7, 500, None):  # 500: more than the batch's positions
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
    for impl, chunk_tokens in (("chunked", 5), ("chunked", None), ("chunked", 100), ("logits", None)):
        model.zero_grad()
        loss = micro_batch_loss(model, batch, 17, head_impl=impl, chunk_tokens=chunk_tokens)
        loss.backward()
        torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
        ours, theirs = gradients(model), gradients(reference)
        assert ours.keys() == theirs.keys()
        assert tied or "lm_head.weight" in ours
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6,
                                       msg=f"{impl}, {chunk_tokens}: {name}")


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


# ----------------------------------------------------------------------------- sharded (2 processes)

WORKER = Path(__file__).with_name("sharded_head_worker.py")


def run_sharded(engine: str):
    """tests/sharded_head_worker.py ENGINE in 2 CPU processes (torchrun, gloo); its result."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               engine]
    # 600 s: DeepSpeed builds one communication op on its first use (about 90 s), once per machine.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def fsdp2_run():
    """One launch of the FSDP2 worker for both of its tests (starting 2 processes costs seconds)."""
    if not torch.distributed.is_available():
        pytest.skip("needs torch.distributed")
    return run_sharded("fsdp2")


def test_chunked_head_under_fsdp2_matches_the_logits_path_for_every_layout(fsdp2_run):
    # Losses, scores and the gradients gathered from the shards within 1e-5 (checked in the worker)
    # for each way FSDP2 can hold the head, tied and untied, auto and 4-position chunks.
    done = fsdp2_run["layouts"]
    layouts = {(r["layout"], r["tied"], r["chunk_tokens"]) for r in done}
    assert layouts == {(layout, tied, chunk) for layout, tied in (("layers+root", False), ("layers+root", True),
                                                                  ("root only", False), ("head alone", False),
                                                                  ("accelerate tail", False),
                                                                  ("accelerate tail", True))
                       for chunk in (None, 4)}
    assert all(r["parameters"] == (20 if r["tied"] else 21) for r in done)  # every one has its gradient
    assert all(r["path"] == "chunked" for r in done)  # none fell back to the logits path
    for r in done:
        # Only a head whose group resharded after the forward is gathered by qtune.head (its own
        # group, once for the check, twice for the losses, twice for the scores); the others are
        # still whole when the loss meets them.
        assert r["head_gathers"] == (5 if r["layout"] == "head alone" else 0), r
        assert r["head_gathered_alone"]


def test_scoring_memory_under_fsdp2_stays_flat_in_the_vocabulary(fsdp2_run):
    # Peak bytes of the tensors a scoring pass creates (see LiveBytes in the worker), at 50k and
    # 200k entries, against a forward that projects one position (what the model needs anyway).
    peak = fsdp2_run["memory"]
    small, large = 50_000, 200_000
    model_growth = peak[f"forward/{large}"] - peak[f"forward/{small}"]
    # The fixed 128-position chunk grows by its two float32 [128 x V] blocks (the measurement sees it) ...
    assert peak[f"128/{large}"] - peak[f"128/{small}"] >= 0.9 * 2 * 128 * (large - small) * 4
    # ... the working block sized to the work does not grow more than the forward does ...
    assert peak[f"auto/{large}"] - peak[f"auto/{small}"] <= model_growth + 2**20
    # ... and stays within two blocks of the budget (2**21 elements here, 228 positions x 32 being less).
    for vocab in (small, large):
        assert peak[f"auto/{vocab}"] <= peak[f"forward/{vocab}"] + 2 * MIN_BLOCK_ELEMENTS * 4 + 2**20


def test_chunked_head_under_zero3_matches_the_logits_path():
    if not torch.distributed.is_available():
        pytest.skip("needs torch.distributed")
    pytest.importorskip("deepspeed")
    # Every parameter partitioned (persistence threshold 0), tied and untied, auto and 4-position
    # chunks; and the head kept whole by the default threshold. Losses, scores and full gradients
    # (safe_get_full_grad) within 1e-5 in the worker.
    done = run_sharded("zero3")
    assert [(r["tied"], r["chunk_tokens"], r["threshold"]) for r in done] == [
        (False, None, 0), (False, 4, 0), (True, None, 0), (True, 4, 0), (False, None, None)]
    assert all(r["parameters"] == (20 if r["tied"] else 21) for r in done)
    assert all(r["path"] == "chunked" for r in done)  # none fell back to the logits path
    # The head starts partitioned; ZeRO-3 keeps it whole after its first gather ("persistent") only
    # under the default threshold.
    assert all(r["head_partitioned_at_start"] for r in done)
    assert [r["head_persistent"] for r in done] == [False, False, False, False, True]
