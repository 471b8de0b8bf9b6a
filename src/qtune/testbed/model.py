"""The testbed's tiny base model: a locally trained tokenizer and a small Llama pretrained on CPU.

Nothing is downloaded. `build_testbed` generates a pretraining corpus with `tasks.make_corpus`
(arithmetic and the stories' language, never the question/answer format nor the chat template),
trains a byte-level BPE tokenizer on it with the `tokenizers` library (digits split one by one, so
arithmetic is learnable), pretrains a `LlamaForCausalLM` of a few million parameters, and saves
model and tokenizer like any Hugging Face checkpoint, beside the default train/test JSONL files:

    <cache>/<key>/model/        config.json, model.safetensors, tokenizer.json, ...
    <cache>/<key>/train.jsonl   make_train_set(config)
    <cache>/<key>/test.jsonl    make_test_set(config)
    <cache>/<key>/recipe.json   the recipe and data config the key was computed from

The key is a hash of the recipe and the data config, so a second call reuses the folder. The cache
root is `cache_dir`, else `$QTUNE_CACHE`, else `~/.cache/qtune/testbed`. Folders are built under a
temporary name and renamed when complete, so an interrupted build never leaves a half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from qtune.errors import QTuneError

from qtune.testbed.tasks import TestbedConfig, make_corpus, make_test_set, make_train_set, write_jsonl

# Bump when the code that turns a recipe into a model or data changes, so old caches are not reused.
BUILD_VERSION = 1

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Every turn is "<|role|>\n" + content + "</s>". Rendering messages[:i] with a generation prompt
# ends in "<|assistant|>\n", which is exactly how the assistant turn messages[i] begins, so renders
# are prefix-stable; the assistant's content ends with the eos token, so generation stops there.
# The {% generation %} markers let `return_assistant_tokens_mask=True` find the trainable part.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelRecipe:
    """Everything that determines the base model; its hash names the cache folder.

    Fields:
        vocab_size: BPE vocabulary size, special tokens included.
        hidden_size, num_layers, num_heads, intermediate_size: the Llama's shape.
        max_length: maximum sequence length (position embeddings, tokenizer model_max_length).
        block_size: length of the packed pretraining sequences.
        batch_size: sequences per pretraining step.
        steps: pretraining steps; the corpus holds steps * batch_size * block_size tokens, so it
            is seen once.
        lr: peak learning rate (AdamW, linear warmup, cosine decay to lr / 10).
        warmup_steps: linear warmup steps.
        weight_decay: AdamW weight decay.
        drill_share: share of corpus documents that are equation drills (the rest are stories).
        tokenizer_documents: corpus documents the tokenizer is trained on.
        seed: seed of the corpus, the tokenizer text and the weights' initialisation.
    """

    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_length: int = 512
    block_size: int = 128
    batch_size: int = 16
    steps: int = 700
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    drill_share: float = 0.6
    tokenizer_documents: int = 3000
    seed: int = 0


@dataclass(frozen=True)
class TestbedPaths:
    """Where a built testbed lies: its folder, the model folder and the two JSONL files."""

    __test__ = False  # a dataclass named Test*, not a pytest class

    root: Path
    model_dir: Path
    train_path: Path
    test_path: Path


def default_cache_root() -> Path:
    """`$QTUNE_CACHE` if set, else `~/.cache/qtune/testbed`."""
    return Path(os.environ.get("QTUNE_CACHE") or Path.home() / ".cache" / "qtune" / "testbed")


def cache_key(recipe: ModelRecipe, config: TestbedConfig) -> str:
    """A short hash of the recipe, the data config and the build code version."""
    spec = {"build_version": BUILD_VERSION, "recipe": dataclasses.asdict(recipe), "data": dataclasses.asdict(config)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with digits split one by one and the chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, UNK, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def _corpus_blocks(recipe: ModelRecipe, tokenizer: PreTrainedTokenizerFast, levels: tuple[tuple[int, int, int], ...],
                   exclude: frozenset[str]) -> torch.Tensor:
    """Pretraining text packed into (steps * batch_size, block_size) token blocks.

    Documents are generated in chunks until there are enough tokens; each is wrapped in bos/eos.
    """
    needed = recipe.steps * recipe.batch_size * recipe.block_size
    ids: list[int] = []
    chunk = 0
    while len(ids) < needed:
        documents = make_corpus(500, seed=recipe.seed * 1000 + chunk, levels=levels, drill_share=recipe.drill_share, exclude=exclude)
        for document in tokenizer(documents, add_special_tokens=False)["input_ids"]:
            ids += [tokenizer.bos_token_id, *document, tokenizer.eos_token_id]
        chunk += 1
    return torch.tensor(ids[:needed]).view(-1, recipe.block_size)


def _lr_factor(step: int, recipe: ModelRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    recipe: ModelRecipe,
    tokenizer: PreTrainedTokenizerFast,
    levels: tuple[tuple[int, int, int], ...] = TestbedConfig.levels,
    exclude: frozenset[str] = frozenset(),
    *,
    progress: bool = True,
) -> LlamaForCausalLM:
    """A fresh Llama of the recipe's shape, trained once over a corpus of stories at these `levels`.

    Problems whose question is in `exclude` (the test questions) stay out of the corpus.
    """
    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_length,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    blocks = _corpus_blocks(recipe, tokenizer, levels, exclude)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(recipe.seed))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    model.train()
    smoothed = None
    bar = tqdm(range(recipe.steps), desc="pretraining", disable=not progress, file=sys.stderr)
    for step in bar:
        batch = blocks[order[step * recipe.batch_size:(step + 1) * recipe.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _build(folder: Path, recipe: ModelRecipe, config: TestbedConfig, key: str, progress: bool) -> None:
    """Write a complete testbed (model, tokenizer, data, recipe.json) into `folder`."""
    started = time.perf_counter()
    train, test = make_train_set(config), make_test_set(config)
    held_out = frozenset(r["question"] for r in test)
    tokenizer_texts = make_corpus(recipe.tokenizer_documents, seed=recipe.seed * 1000 + 999, levels=config.levels)
    # The tokenizer also sees questions and answers, so their words are whole tokens; the model
    # itself never trains on that format before fine-tuning.
    tokenizer_texts += [r["question"] + "\n" + r["answer"] for r in make_train_set(
        TestbedConfig(train_size=1000, seed=recipe.seed + 10_000, levels=config.levels, level_weights=config.level_weights))]
    tokenizer = train_tokenizer(tokenizer_texts, recipe.vocab_size, recipe.max_length)
    model = pretrain(recipe, tokenizer, config.levels, held_out, progress=progress)
    model_dir = folder / "model"
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:  # transformers shows its own bar while writing the weights
        hf_logging.disable_progress_bar()
    try:
        # transformers v5 always saves weights as safetensors (model.safetensors).
        model.save_pretrained(model_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(model_dir)
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(test, folder / "test.jsonl")
    info = {
        "key": key,
        "build_version": BUILD_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "data": dataclasses.asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (folder / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")


def build_testbed(
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    recipe: ModelRecipe = ModelRecipe(),
    config: TestbedConfig = TestbedConfig(),
) -> TestbedPaths:
    """Build the testbed (or reuse the cached one) and return where it lies.

    `cache_dir` defaults to `default_cache_root()`. `force=True` rebuilds even when a cached
    testbed with the same key exists, and replaces it once the new one is complete.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    key = cache_key(recipe, config)
    final = root / key
    paths = TestbedPaths(final, final / "model", final / "train.jsonl", final / "test.jsonl")
    if final.is_dir() and not force:
        return paths
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.building-", dir=root))
    except OSError as exc:
        raise QTuneError(f"cannot write the testbed cache in {root} ({exc.strerror}); pass another folder or set QTUNE_CACHE") from None
    try:
        if progress:
            print(f"building the qtune testbed in {final}", file=sys.stderr)
        _build(work, recipe, config, key, progress)
        if final.is_dir():  # force, or another process finished first: swap the old one out
            old = Path(tempfile.mkdtemp(prefix=f".{key}.old-", dir=root))
            os.replace(final, old / key)
            shutil.rmtree(old)
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


def load_testbed_model(paths: TestbedPaths) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The model and tokenizer of a built testbed, loaded through the Auto classes."""
    return AutoModelForCausalLM.from_pretrained(paths.model_dir), AutoTokenizer.from_pretrained(paths.model_dir)


__all__ = [
    "BUILD_VERSION", "CHAT_TEMPLATE", "ModelRecipe", "TestbedPaths", "build_testbed", "default_cache_root",
    "load_testbed_model", "pretrain", "cache_key", "train_tokenizer",
]
