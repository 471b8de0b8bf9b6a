"""One process of tests/test_head.py's sharded tests (run by torchrun, 2 CPU processes over gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 sharded_head_worker.py fsdp2
    python -m torch.distributed.run --standalone --nproc_per_node 2 sharded_head_worker.py zero3

Each engine shards two copies of the same tiny Llama; each process feeds both its own micro-batches
(different on each process, so that the gradients must be reduced). One copy takes the chunked
head, the other the full-logits path (the engine's ordinary autograd); the losses, the scores and
the gradients gathered from the shards must agree within 1e-5. Under FSDP2 the worker also
measures the peak bytes of the tensors a scoring pass creates, at two vocabularies (`LiveBytes`).
Rank 0 prints `RESULT <json>`.
"""

import copy
import json
import sys
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

import qtune.head
from qtune.scoring import IGNORE_INDEX, score_batch
from qtune.step import micro_batch_loss

TOLERANCE = 1e-5
MEMORY_VOCABS = (50_000, 200_000)


def tiny_llama(vocab=300, tied=False):
    torch.manual_seed(0)  # the same weights on every process
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def micro_batches(rank, vocab=300, count=2, rows=3, length=20):
    """`count` micro-batches of random tokens, different on each process: a prompt, an answer, padding."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, vocab, (rows, length), generator=g)
        attention_mask = torch.ones_like(input_ids)
        labels = input_ids.clone()
        labels[:, :6] = IGNORE_INDEX
        attention_mask[-1, length - 4:] = 0
        labels[-1, length - 4:] = IGNORE_INDEX
        out.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                    "sample_id": torch.arange(rows)})
    return out


def check_close(a, b, what):
    if not torch.allclose(a.float(), b.float(), rtol=TOLERANCE, atol=TOLERANCE):
        raise AssertionError(f"{what}: differs by {(a.float() - b.float()).abs().max().item():.3g}")


def compare(chunked, logits, batches, full_grad, step, chunk_tokens):
    """Loss, gradients (gathered by `full_grad`) and scores of the chunked head against the
    logits path, over `batches` accumulated; `step(model)` ends a backward where the engine needs it."""
    for batch in batches:
        ours = micro_batch_loss(chunked, batch, 40, 2, head_impl="chunked", chunk_tokens=chunk_tokens)
        theirs = micro_batch_loss(logits, batch, 40, 2, head_impl="logits")
        check_close(ours.detach(), theirs.detach(), "loss")
        step(chunked, ours)
        step(logits, theirs)
    names = [n for n, _ in qtune.head.base_model(logits).named_parameters()]
    ours = dict(qtune.head.base_model(chunked).named_parameters())
    theirs = dict(qtune.head.base_model(logits).named_parameters())
    for name in names:
        a, b = full_grad(ours[name]), full_grad(theirs[name])
        if a is None or b is None or not b.abs().sum() > 0:
            raise AssertionError(f"{name}: no gradient (chunked {a is None}, logits {b is None})")
        check_close(a, b, f"gradient of {name}")
    with torch.no_grad():
        for batch in batches:
            args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
            ours = score_batch(chunked, *args, head_impl="chunked", chunk_tokens=chunk_tokens)
            theirs = score_batch(logits, *args, head_impl="logits")
            check_close(ours.nll, theirs.nll, "scored nll")
            check_close(ours.entropy, theirs.entropy, "scored entropy")
    return sorted(names)


# ----------------------------------------------------------------------------------------- FSDP2


def fsdp2_layouts():
    """How FSDP2 can hold the head: in the root's group (kept unsharded after the forward), in the
    only group, in a group of its own that reshards after the forward (a DTensor when the loss
    meets it), in accelerate's [final norm, head] group (kept unsharded; tied: with the embedding)."""
    from torch.distributed.fsdp import fully_shard

    def layers_then_root(model):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)

    def head_alone(model):
        fully_shard(model.lm_head, reshard_after_forward=True)
        layers_then_root(model)

    def root_only(model):
        fully_shard(model)

    def accelerate_tail(model):
        for layer in model.model.layers:
            fully_shard(layer)
        tail = [model.model.norm, model.lm_head]
        if model.lm_head.weight is model.model.embed_tokens.weight:
            tail.insert(1, model.model.embed_tokens)
        fully_shard(tail, reshard_after_forward=False)
        fully_shard(model)

    return [("layers+root", False, layers_then_root), ("layers+root", True, layers_then_root),
            ("root only", False, root_only), ("head alone", False, head_alone),
            ("accelerate tail", False, accelerate_tail), ("accelerate tail", True, accelerate_tail)]


def full_gradient(parameter):
    """The whole gradient of an FSDP2 parameter (its shards gathered), None without one."""
    return None if parameter.grad is None else parameter.grad.full_tensor()


def run_fsdp2(rank):
    from torch.distributed.fsdp import FSDPModule

    # FSDP2 gathers through its parameter groups; FSDPModule.unshard is only called by qtune.head,
    # where the head's group resharded after the forward: counted, to see which path each layout takes.
    unshard = FSDPModule.unshard
    gathers = []

    def counted(module, *args, **kwargs):
        gathers.append(module)
        return unshard(module, *args, **kwargs)

    FSDPModule.unshard = counted
    done = []
    for name, tied, shard in fsdp2_layouts():
        for chunk_tokens in (None, 4):
            chunked = tiny_llama(tied=tied)
            logits = copy.deepcopy(chunked)
            shard(chunked)
            shard(logits)
            gathers.clear()
            names = compare(chunked, logits, micro_batches(rank), full_gradient, lambda model, loss: loss.backward(),
                            chunk_tokens)
            done.append({"layout": name, "tied": tied, "chunk_tokens": chunk_tokens, "parameters": len(names),
                         "path": qtune.head.resolve_head_impl(chunked, "chunked"), "head_gathers": len(gathers),
                         "head_gathered_alone": all(m is chunked.lm_head for m in gathers)})
    return done


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created by operations while active and alive at once: each new
    storage counts from the operation that returns it until its last tracked tensor is freed.
    Views and in-place results of earlier tensors are not new; storage that FSDP2 resizes in
    place for its unsharded parameters is not counted (it is not an operation's output)."""

    def __init__(self):
        super().__init__()
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                key = t.untyped_storage().data_ptr()
                if key in inputs:
                    continue
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._free, key)
        return out

    def _free(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)


def run_fsdp2_memory(rank):
    """Peak bytes created by a scoring pass and by a forward that projects one position, at two
    vocabularies, with the working block sized to the work (None) and fixed at 128 positions."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    for vocab in MEMORY_VOCABS:
        model = tiny_llama(vocab)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        batch = micro_batches(rank, vocab, count=1, rows=4, length=64)[0]
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.no_grad():
            score_batch(model, *args)  # FSDP2's lazy initialisation, outside the measurement
            for label, run in (("forward", lambda: model(input_ids=args[0], attention_mask=args[1], logits_to_keep=1)),
                               ("auto", lambda: score_batch(model, *args)),
                               ("128", lambda: score_batch(model, *args, chunk_tokens=128))):
                with LiveBytes() as tracker:
                    run()
                out[f"{label}/{vocab}"] = tracker.peak
        out["positions"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return out


# ---------------------------------------------------------------------------------------- ZeRO-3


def run_zero3(rank):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    done = []
    # Threshold 0: every parameter partitioned; None: ZeRO-3's default, which keeps parameters this
    # small (the head: 300 x 32) whole on every process.
    for tied, chunk_tokens, threshold in ((False, None, 0), (False, 4, 0), (True, None, 0), (True, 4, 0),
                                          (False, None, None)):
        zero = {"stage": 3} | ({} if threshold is None else {"stage3_param_persistence_threshold": threshold})
        config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "zero_optimization": zero,
                  "zero_allow_untested_optimizer": True}
        engines = []
        for _ in range(2):
            model = tiny_llama(tied=tied)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            engines.append(deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0])
        chunked, logits = engines
        partitioned = chunked.module.lm_head.weight.numel() == 0
        names = compare(chunked, logits, micro_batches(rank), safe_get_full_grad,
                        lambda engine, loss: engine.backward(loss), chunk_tokens)
        done.append({"tied": tied, "chunk_tokens": chunk_tokens, "threshold": threshold, "parameters": len(names),
                     "path": qtune.head.resolve_head_impl(chunked, "chunked"),
                     "head_partitioned_at_start": partitioned,
                     "head_persistent": chunked.module.lm_head.weight.ds_persist})
    return done


def main():
    engine = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    if engine == "fsdp2":
        result = {"layouts": run_fsdp2(rank), "memory": run_fsdp2_memory(rank)}
    else:
        result = run_zero3(rank)
    if rank == 0:
        print("RESULT " + json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
