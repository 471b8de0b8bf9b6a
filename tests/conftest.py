"""Shared fixtures: a tiny real tokenizer trained in memory (byte-level BPE, lossless decoding).

`tiny_tokenizer` has a chat template built from its special tokens; `plain_tokenizer` is the
same vocabulary without a chat template. Both have <s> (BOS), </s> (EOS), <pad> and <unk>.
Session-scoped: do not mutate them (copy.deepcopy first). Every test's tokenized-data cache
($QTUNE_DATA_CACHE) is a temporary folder.
"""

from __future__ import annotations

import random

import pytest

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _training_texts() -> list[str]:
    """A few hundred short strings with letters, digits and punctuation."""
    rng = random.Random(0)
    words = (
        "the a is are was what how many much apples cats dogs answer question total sum each has "
        "gives buys sells left more less than and or not Tom Ann costs dollars per day hours"
    ).split()
    texts = []
    for _ in range(300):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        texts.append(f"User: {phrase.capitalize()}, {a} + {b}?\nAssistant: {a} + {b} = {a + b}. ({a}*{b}={a * b}); "
                     f"50% off! $3.5, \"ok\" #### {a - b}")
    return texts


def _build_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS + CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> in practice
        show_progress=False,
    )
    backend.train_from_iterator(_training_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=CHAT_TOKENS,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """The tokenized-data cache of every test (and of the commands they start) in a temporary folder,
    never the user's ~/.cache/qtune/tokenized."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QTUNE_DATA_CACHE", str(tmp_path_factory.mktemp("tokenized-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (600 tokens) with a chat template: <s><|user|>...<|end|><|assistant|>...<|end|>."""
    return _build_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def plain_tokenizer():
    """The same tokenizer without a chat template (qtune then uses its plain template)."""
    return _build_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama (hidden 32, 2 layers) saved with `tiny_tokenizer` in a folder that
    `from_pretrained` loads, like any local model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-model") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tiny_tokenizer.pad_token_id,
                         bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
