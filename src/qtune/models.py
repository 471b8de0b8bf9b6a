"""Loading a causal language model and its tokenizer the way every qtune command does.

One path for everything: what a user names goes through `pretrained.resolve_model_path` (a known
name such as `smollm2-135m-instruct` or a `.gguf` file becomes a converted folder in qtune's cache,
fetched or converted on first use), then through `from_pretrained`, so the testbed model, the real
pretrained model and a user's model are loaded by the same code.
"""

from __future__ import annotations

import os
import platform

import torch
from safetensors import SafetensorError

from .errors import QTuneError, first_line
from .pretrained import resolve_model_path, unknown_model_hint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QTuneError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)


def machine_stamp(device: str | torch.device = "cpu", processes: int = 1) -> str:
    """The machine a summary's numbers come from: architecture, CPUs, device x processes, torch
    version and torch's CPU threads (a CPU run repeats exactly only at the same thread count: the
    float reductions run in another order)."""
    return (f"{platform.machine()}, {os.cpu_count()} cpus, {device} x {processes}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} cpu threads")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it and float32 otherwise."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise QTuneError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, pad_token: str | None = None):
    """Load a tokenizer; `pad_token` sets one for tokenizers that ship without (e.g. its EOS)."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise QTuneError(f"could not load a tokenizer from {name_or_path!r}: {first_line(exc)}"
                         f"{unknown_model_hint(name_or_path)}") from exc
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise QTuneError(f"--pad-token {pad_token!r} is not in the tokenizer's vocabulary")
        tokenizer.pad_token = pad_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a causal LM from safetensors weights onto `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(name_or_path)
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=resolve_dtype(dtype, dev),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except SafetensorError as exc:
        raise QTuneError(f"the weights of {name_or_path!r} are unreadable (a truncated or corrupt .safetensors "
                         f"file, e.g. from an interrupted copy or save): {first_line(exc)}") from exc
    except (OSError, ValueError) as exc:
        raise QTuneError(f"could not load a model from {name_or_path!r}: {first_line(exc)}"
                         f"{unknown_model_hint(name_or_path)}") from exc
    return model.to(dev).eval()


def check_vocabulary(model, tokenizer, name_or_path: str) -> None:
    """Refuse a tokenizer that can produce ids the model's embedding has no row for.

    Without this check the first such id fails deep inside the forward pass with
    `IndexError: index out of range in self`. A larger embedding than the tokenizer is fine
    (many models pad the vocabulary to a multiple of 64 or 128).
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise QTuneError(f"the tokenizer of {name_or_path!r} has {len(tokenizer)} tokens but the model's embedding "
                         f"only {rows} rows: they do not belong together (resize the embedding with "
                         f"model.resize_token_embeddings(len(tokenizer)) and save the model, or use the matching tokenizer)")


def base_model(model):
    """The transformers model inside DDP/FSDP wrappers (`.module`) and PEFT adapters."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model, purpose: str) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(the module holding the decoder layers, the layers) of a transformers decoder, through DDP
    and PEFT wrappers; QTuneError naming `purpose` when it has no `layers` list (Llama, Qwen2,
    Mistral, Gemma, Phi-3 and most decoders have one)."""
    model = base_model(model)
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise QTuneError(f"{purpose} needs a decoder whose blocks are a `layers` list (Llama, Qwen2, Mistral, "
                         f"...); {type(model).__name__} has none")
    return body, layers
