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

Two presets exist (`PRESETS`): "saturated" (the default: `saturated`, a model that already solves
the problems in another layout, shipped with the package; it also writes `dev.jsonl`) and
"data-starved" (`tasks`, a model far from knowing the task, pretrained here in ~2.5 minutes). The key is a hash of the recipe and the data config (and, for the saturated
preset, the preset name, the generator's sha256 and SATURATED_BUILD_VERSION), so a second call
reuses the folder. The cache
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from qtune.errors import QTuneError
from qtune.io import cache_root, replace_dir

from qtune.testbed import saturated, shipped
from qtune.testbed.saturated import SaturatedConfig
from qtune.testbed.tasks import TestbedConfig, make_corpus, make_test_set, make_train_set, write_jsonl

# Bump when the code that turns a recipe into a model or data changes, so old caches are not reused.
BUILD_VERSION = 1
# The same for the saturated preset's build code (its tokenizer, its packing); its data generator is
# covered by the generator's sha256. Kept apart so that data-starved keys never change with it.
SATURATED_BUILD_VERSION = 3

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

# The saturated preset's chat template: no role tokens at all, only text the base model was
# pretrained on. A turn is its content and a line break ("<s>" + question + "\n"), the assistant's
# content ends with the eos token, and the generation prompt is empty, so renders stay prefix-stable
# and generation stops at eos. It is still not the pretraining layout (no "Problem:", "Solution:" or
# "Answer:" lines; the answer ends "#### N"), but SFT no longer has to teach the meaning of role
# tokens the base model never saw (they stay in the vocabulary, unused). On A1 it measured about
# the same as the role-token template (docs/testbed.md, second calibration round). The data-starved
# preset keeps CHAT_TEMPLATE.
SATURATED_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
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
class Preset:
    """A named testbed recipe.

    Fields:
        name: the name `build_testbed(preset=...)` takes.
        recipe: the base model's default recipe.
        config: the data's default config (`TestbedConfig` or `SaturatedConfig`, which also picks
            the generator).
        description: one line for listings.
        sft_settings: the fine-tuning and evaluation options calibrated for this preset
            (docs/testbed.md), as keyword arguments of `TrainConfig` / `BenchConfig`.
    """

    name: str
    recipe: ModelRecipe
    config: TestbedConfig | SaturatedConfig
    description: str
    sft_settings: dict = dataclasses.field(default_factory=dict)


# The saturated preset is the default since generator 877a4480...: A0 and A2-A4 pass, A1's first half
# fails by about 2 points (random 25% of the defect-free data against all of it; docs/testbed.md).
PRESETS = {
    "data-starved": Preset("data-starved", ModelRecipe(), TestbedConfig(),
                           "a 0.96 M Llama far from knowing the task; SFT teaches format and arithmetic",
                           {"epochs": 5.0, "lr": 1e-3, "batch_size": 16, "warmup_ratio": 0.05, "max_new_tokens": 200,
                            "eval_batch_size": 64}),
    "saturated": Preset(
        "saturated",
        ModelRecipe(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
                    block_size=512, batch_size=8, steps=4000, lr=3e-3, warmup_steps=100, drill_share=0.5,
                    tokenizer_documents=3000),
        SaturatedConfig(),
        "a model pretrained to solve the problems in a textbook layout; SFT mostly teaches the GSM8K format",
        # Chosen on the dev split with the ground-truth controls only, before any pruning method ran
        # (docs/testbed.md): lr 1e-3 disturbed the base model's arithmetic for the first epoch.
        {"epochs": 3.0, "lr": 3e-4, "batch_size": 4, "warmup_ratio": 0.05, "max_new_tokens": 200,
         "eval_batch_size": 64},
    ),
}
DEFAULT_PRESET = "saturated"


@dataclass(frozen=True)
class TestbedPaths:
    """Where a built testbed lies: its folder, the model folder and the JSONL files (`dev_path` is
    None for presets without a dev split)."""

    __test__ = False  # a dataclass named Test*, not a pytest class

    root: Path
    model_dir: Path
    train_path: Path
    test_path: Path
    dev_path: Path | None = None


def default_cache_root() -> Path:
    """`$QTUNE_CACHE` if set, else `~/.cache/qtune/testbed` (`qtune.io.cache_root`)."""
    return cache_root("testbed")


def cache_key(recipe: ModelRecipe, config: TestbedConfig | SaturatedConfig) -> str:
    """A short hash of the recipe, the data config and the build code version.

    The data-starved spec is unchanged since BUILD_VERSION 1, so its existing caches stay valid; a
    saturated config adds the preset name, the generator's sha256 and SATURATED_BUILD_VERSION, and
    for the preset's own recipe the pinned hashes of the shipped base model (`shipped.SHA256`).
    """
    spec = {"build_version": BUILD_VERSION, "recipe": dataclasses.asdict(recipe), "data": dataclasses.asdict(config)}
    if isinstance(config, SaturatedConfig):
        spec |= {"preset": "saturated", "generator_sha256": saturated.GENERATOR_SHA256,
                 "saturated_build_version": SATURATED_BUILD_VERSION}
        if recipe == PRESETS["saturated"].recipe:
            spec["base_model"] = shipped.SHA256
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int, *, whole_numbers: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the chat template.

    Digits are split one by one, or with `whole_numbers` a number is a word like the others (the
    byte-level split: with its leading space, if any), so a number seen often enough in `texts`
    becomes one token: " 19" after a word or "=", "19" right after "<<", "=" or a line start. Keeping
    the space on the number matters for copying: if every number followed the same space token, the
    token before a number would never tell which number of the question comes next.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = byte_level if whole_numbers else pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
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


def _corpus_blocks(recipe: ModelRecipe, tokenizer: PreTrainedTokenizerFast, corpus: Callable[[int], list[str]],
                   whole_documents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining text as (steps * batch_size, block_size) blocks of token ids and of labels.

    `corpus(seed)` gives 500 documents; chunks with seeds recipe.seed * 1000 + 0, 1, ... are drawn
    until there are enough blocks. Each document is wrapped in bos/eos. The documents run on from
    block to block (labels = ids), or with `whole_documents` each block holds only whole documents,
    padded at the end (label -100, id 0, which no earlier position attends to), so that a solution
    is never seen without its problem; documents longer than a block are left out.
    """
    n_blocks = recipe.steps * recipe.batch_size
    blocks: list[list[int]] = []
    ids: list[int] = []
    chunk = 0
    while len(blocks) < n_blocks:
        documents = corpus(recipe.seed * 1000 + chunk)
        encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
        if whole_documents and all(len(document) + 2 > recipe.block_size for document in encoded):
            raise QTuneError(f"block_size {recipe.block_size} is shorter than every pretraining document")
        for document in encoded:
            wrapped = [tokenizer.bos_token_id, *document, tokenizer.eos_token_id]
            if whole_documents and len(ids) + len(wrapped) > recipe.block_size:
                if len(wrapped) > recipe.block_size:
                    continue
                blocks.append(ids + [-100] * (recipe.block_size - len(ids)))
                ids = []
            ids += wrapped
            while len(ids) >= recipe.block_size:
                blocks.append(ids[:recipe.block_size])
                ids = ids[recipe.block_size:]
        chunk += 1
    labels = torch.tensor(blocks[:n_blocks])
    return labels.clamp(min=0), labels


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
    corpus: Callable[[int], list[str]] | None = None,
    whole_documents: bool = False,
    after_step: Callable[[int, LlamaForCausalLM], None] | None = None,
) -> LlamaForCausalLM:
    """A fresh Llama of the recipe's shape, trained once over a corpus of stories at these `levels`.

    Problems whose question is in `exclude` (the test questions) stay out of the corpus. `corpus`,
    when given, replaces that corpus: `corpus(seed)` returns 500 documents; `whole_documents` packs
    only whole documents into each block (see `_corpus_blocks`). `after_step(steps_done, model)`
    is called after every optimizer step (to probe the model during training; it must leave the
    model in train mode and draw no random numbers, or the weights change).
    """
    if corpus is None:
        def corpus(seed: int) -> list[str]:
            return make_corpus(500, seed=seed, levels=levels, drill_share=recipe.drill_share, exclude=exclude)

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
    blocks, labels = _corpus_blocks(recipe, tokenizer, corpus, whole_documents)
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
        rows = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
        loss = model(input_ids=blocks[rows], labels=labels[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}")
        if after_step is not None:
            after_step(step + 1, model)
    model.eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pretrain_saturated(recipe: ModelRecipe, config: SaturatedConfig, *, progress: bool = True,
                       after_step: Callable[[int, LlamaForCausalLM, PreTrainedTokenizerFast], None] | None = None,
                       ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The saturated preset's tokenizer and base model for `recipe`, pretrained on the textbook
    corpus of `config` (`saturated.make_textbook_corpus`), which never holds a question of the
    config's splits. `after_step(steps_done, model, tokenizer)`: as in `pretrain`."""
    # Splits drawn with the defect fields the shipped model saw (`saturated.pretraining_config`): the
    # tokenizer's text and the excluded questions do not follow later changes to the SFT data's defects.
    pretraining = saturated.pretraining_config(config)
    every_question = frozenset(r["question"] for split in saturated.make_splits(pretraining) for r in split)
    tokenizer_texts = saturated.make_textbook_corpus(recipe.tokenizer_documents, recipe.seed * 1000 + 999, config,
                                                     drill_share=recipe.drill_share)
    # The tokenizer also sees the GSM8K layout with its calculator annotations, so its words are
    # whole tokens, and every number up to 99 often enough to become one token, with and without
    # its leading space (tested); the model never trains on this text. (Annotated whatever the
    # config says: the shipped tokenizer was trained on exactly this text.)
    tokenizer_texts += [r["question"] + "\n" + r["answer"] for r in saturated.make_splits(dataclasses.replace(
        pretraining, train_size=1000, dev_size=0, test_size=0, seed=recipe.seed + 10_000, annotations=True))[0]]
    tokenizer_texts += [" ".join(map(str, range(100))), "\n".join(map(str, range(100)))] * 20
    tokenizer = train_tokenizer(tokenizer_texts, recipe.vocab_size, recipe.max_length, whole_numbers=True)
    tokenizer.chat_template = SATURATED_CHAT_TEMPLATE  # pretraining never uses it

    def corpus(seed: int) -> list[str]:
        return saturated.make_textbook_corpus(500, seed, config, drill_share=recipe.drill_share, exclude=every_question)

    hook = None if after_step is None else (lambda step, model: after_step(step, model, tokenizer))
    return pretrain(recipe, tokenizer, progress=progress, corpus=corpus, whole_documents=True, after_step=hook), tokenizer


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, model_dir: Path, progress: bool) -> None:
    """Write model and tokenizer into `model_dir` like any Hugging Face checkpoint (safetensors)."""
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


def _parameter_count(model_dir: Path) -> int:
    """Parameters stored in the folder's model.safetensors (tied embeddings are stored once)."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def _build(folder: Path, recipe: ModelRecipe, config: TestbedConfig | SaturatedConfig, key: str, progress: bool) -> None:
    """Write a complete testbed (model, tokenizer, data, recipe.json) into `folder`."""
    started = time.perf_counter()
    if isinstance(config, SaturatedConfig):
        train, dev, test = saturated.make_splits(config)
        splits = {"train": train, "dev": dev, "test": test}
        extra = {"preset": "saturated", "generator_sha256": saturated.GENERATOR_SHA256,
                 "saturated_build_version": SATURATED_BUILD_VERSION}
        if recipe == PRESETS["saturated"].recipe:
            # Pretraining this recipe takes about an hour of CPU: its result ships with qtune.
            shipped.install(folder / "model")
            # The shipped folder holds the role-token template it was saved with; the preset's
            # template replaces it (chat_template.jinja is not pinned: the weights and
            # tokenizer.json are, and stay byte-identical).
            (folder / "model" / "chat_template.jinja").write_text(SATURATED_CHAT_TEMPLATE)
            extra["base_model"] = {"shipped": shipped.SHA256}
        else:
            model, tokenizer = pretrain_saturated(recipe, config, progress=progress)
            save_model(model, tokenizer, folder / "model", progress)
    else:
        train, test = make_train_set(config), make_test_set(config)
        splits = {"train": train, "test": test}
        held_out = frozenset(r["question"] for r in test)
        tokenizer_texts = make_corpus(recipe.tokenizer_documents, seed=recipe.seed * 1000 + 999, levels=config.levels)
        # The tokenizer also sees questions and answers, so their words are whole tokens; the model
        # itself never trains on that format before fine-tuning.
        tokenizer_texts += [r["question"] + "\n" + r["answer"] for r in make_train_set(
            TestbedConfig(train_size=1000, seed=recipe.seed + 10_000, levels=config.levels, level_weights=config.level_weights))]
        tokenizer = train_tokenizer(tokenizer_texts, recipe.vocab_size, recipe.max_length)
        model = pretrain(recipe, tokenizer, config.levels, held_out, progress=progress)
        extra = {}
        save_model(model, tokenizer, folder / "model", progress)
    for name, records in splits.items():
        write_jsonl(records, folder / f"{name}.jsonl")
    info = {
        "key": key,
        **extra,
        "build_version": BUILD_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "data": dataclasses.asdict(config),
        "parameters": _parameter_count(folder / "model"),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (folder / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")


def build_testbed(
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    preset: str = DEFAULT_PRESET,
    recipe: ModelRecipe | None = None,
    config: TestbedConfig | SaturatedConfig | None = None,
    data_seed: int | None = None,
) -> TestbedPaths:
    """Build the testbed (or reuse the cached one) and return where it lies.

    `preset` names an entry of `PRESETS`; `recipe` and `config` replace its defaults (the config's
    type must match the preset). `data_seed` replaces the config's seed: another draw of the
    problems and defects with the same generator and defect mix (0 is the preset's own draw). The
    saturated preset's base model is the shipped one whatever the draw; the data-starved preset's
    is pretrained for each draw, since its corpus leaves out that draw's test questions.
    `cache_dir` defaults to `default_cache_root()`. `force=True` rebuilds even when a cached
    testbed with the same key exists, and replaces it once the new one is complete.
    """
    if preset not in PRESETS:
        raise QTuneError(f"unknown testbed preset {preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = PRESETS[preset].recipe if recipe is None else recipe
    config = PRESETS[preset].config if config is None else config
    if data_seed is not None:
        if data_seed < 0:
            raise QTuneError(f"the data seed must be a non-negative integer, not {data_seed}")
        config = dataclasses.replace(config, seed=data_seed)
    if type(config) is not type(PRESETS[preset].config):
        raise QTuneError(f"the {preset} preset takes a {type(PRESETS[preset].config).__name__}, not a {type(config).__name__}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    key = cache_key(recipe, config)
    final = root / key
    dev = final / "dev.jsonl" if isinstance(config, SaturatedConfig) else None
    paths = TestbedPaths(final, final / "model", final / "train.jsonl", final / "test.jsonl", dev)
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
        replace_dir(work, final)  # a damaged or older entry is swapped out
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


def load_testbed_model(paths: TestbedPaths) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The model and tokenizer of a built testbed, loaded through the Auto classes."""
    return AutoModelForCausalLM.from_pretrained(paths.model_dir), AutoTokenizer.from_pretrained(paths.model_dir)


__all__ = [
    "BUILD_VERSION", "CHAT_TEMPLATE", "SATURATED_CHAT_TEMPLATE", "DEFAULT_PRESET", "PRESETS", "ModelRecipe", "Preset", "TestbedPaths", "build_testbed", "default_cache_root",
    "load_testbed_model", "pretrain", "cache_key", "train_tokenizer",
]
