"""Configuration dataclasses: one definition serves the CLI flags, YAML files and the Python API.

Every field carries its help text in `metadata["help"]`; `add_arguments` turns a dataclass into
argparse flags (`max_length` -> `--max-length`) and `build_config` merges defaults, an optional
YAML file (read with `yaml.safe_load`) and the flags given on the command line, in that order.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QTuneError


def option(default=None, help: str = "", *, choices=None, required: bool = False):
    """A documented config field."""
    meta = {"help": help, "choices": choices, "required": required}
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    model: str = option(help="Local folder or hub id of a causal language model.", required=True)
    dtype: str = option("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.",
                        choices=["auto", "float32", "bfloat16", "float16"])
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:N.")
    trust_remote_code: bool = option(False, "Run code shipped with the model. Off unless you trust its source.")
    pad_token: str | None = option(None, "Token to use for padding when the tokenizer has none (e.g. its EOS).")


@dataclass
class DataConfig:
    data: str = option(help="Dataset file (.jsonl, .json, .parquet, .csv) or a saved `datasets` folder.",
                       required=True)
    format: str = option("auto", "Record format; auto detects it from the first record.",
                         choices=["auto", "alpaca", "prompt_completion", "question_answer", "messages", "sharegpt"])
    max_length: int = option(1024, "Maximum tokens per sample; longer samples are truncated.")
    truncation_side: str = option("right", "Which end a too-long sample loses.", choices=["right", "left"])
    skip_invalid: bool = option(False, "Skip malformed records (and report them) instead of stopping.")
    limit: int | None = option(None, "Use only the first N records.")


@dataclass
class ScoreConfig(DataConfig, ModelConfig):
    out: str = option(help="Output folder for scores.parquet, summary and plot.", required=True)
    batch_size: int = option(8, "Samples per scoring batch (batches are bucketed by length).")
    r_sample: float = option(0.25, "Sample keep ratio used to place samples in quadrants.")
    per_token: bool = option(False, "Also write per-token NLL and entropy arrays.")
    plot: bool = option(True, "Write the EU-plane plot (needs matplotlib: pip install qtune[plots]).")
    chunk_tokens: int = option(128, "Positions whose float32 log-probabilities are computed at once.")


#: Strings that end a generation by default (besides EOS and the chat template's end of turn).
DEFAULT_STOP = ("Question:", "</s>", "<|im_end|>")


@dataclass
class EvalConfig:
    """Generation settings of `qtune.evaluate.evaluate_exact_match`."""

    max_new_tokens: int = option(256, "Most tokens generated per sample.")
    batch_size: int = option(16, "Prompts generated at once (batches group prompts of similar length).")
    num_fewshot: int = option(0, "Solved examples prepended to each prompt as earlier turns.")
    fewshot_seed: int = option(1234, "Seed of the few-shot example draw.")
    stop: tuple[str, ...] = option(DEFAULT_STOP, "Strings that end a generation (the EOS always does).")
    limit: int | None = option(None, "Evaluate only the first N records.")
    device: str = option("auto", "auto (wherever the model is), cpu, cuda, cuda:N (the model is moved there).")


@dataclass
class EvalRunConfig(EvalConfig, DataConfig, ModelConfig):
    out: str = option(help="Output folder for predictions.jsonl and metrics.json.", required=True)
    fewshot_data: str | None = option(None, "File to draw few-shot examples from (e.g. the train split).")
    perplexity: bool = option(True, "Also compute held-out perplexity of the reference answers.")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls`; flags not given stay absent from the namespace."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = args[0] if args else hint
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and f.default is not None:
            text += f" (default: {f.default})"
        common = dict(dest=f.name, help=text, default=argparse.SUPPRESS)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="*", type=str, **common)
        else:
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), **common)


def load_yaml(path: str | Path, cls: type) -> dict:
    """Read a YAML config (safely) and check that every key is a field of `cls`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise QTuneError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise QTuneError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise QTuneError(f"{path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise QTuneError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return values


def build_config(cls: type, namespace: argparse.Namespace | None = None, yaml_path: str | None = None):
    """Defaults < YAML file < command-line flags; required fields must be set by one of them."""
    values = load_yaml(yaml_path, cls) if yaml_path else {}
    if namespace is not None:
        values.update({f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)})
    missing = [f.name for f in dataclasses.fields(cls) if f.metadata.get("required") and values.get(f.name) is None]
    if missing:
        raise QTuneError("missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and f.name in values and values[f.name] not in choices:
            raise QTuneError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}")
    tuples = {f.name for f in dataclasses.fields(cls) if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple}
    values.update({k: tuple(v) for k, v in values.items() if k in tuples and v is not None})
    return cls(**values)


@dataclass
class TokenPruningConfig:
    """How Q-Tuning triages samples and prunes tokens (shared by `qtune train` and `qtune bench`)."""

    lam: float = option(0.5, "Weight of the neighbours in the token score s_i (lambda).")
    neighbor: str = option("sum", "Neighbour term: sum of both neighbours (paper, authors' code) or their mean.",
                           choices=["sum", "mean"])
    edge: str = option("zero", "A missing neighbour at either end of the response counts 0, or as the token itself.",
                       choices=["zero", "replicate"])
    token_budget: str = option("sample", "Token budget per sample (paper) or pooled per batch (authors' code).",
                               choices=["sample", "batch"])
    reference: bool = option(False, "Reproduce the authors' code: strict comparisons, tolerance stop, top-up "
                                    "only, pooled token budget, entropy over attended positions.")
    triage_start: float = option(0.0, "Fraction of the optimizer steps that pass before triage starts; until "
                                      "then qtuning keeps samples and tokens at random at the same r_sample and "
                                      "r_token (same budget, no scoring pass). The paper triages from step 0.")


@dataclass
class PruningConfig(TokenPruningConfig):
    method: str = option("qtuning", "Pruning method (see `qtune methods`): full, random, qtuning, ...")
    r_sample: float = option(0.25, "Fraction of each step's samples that are trained on.")
    r_token: float = option(0.7, "Fraction of response tokens kept in token-pruned (Q2) samples.")


@dataclass
class OptimConfig:
    """Optimisation and adapters (shared by `qtune train` and `qtune bench`)."""

    epochs: float = option(1.0, "Training epochs over the full dataset (every sample is scored each epoch).")
    max_steps: int = option(-1, "Stop after this many optimizer steps (overrides --epochs when > 0).")
    batch_size: int = option(8, "Samples per micro-batch, before pruning.")
    grad_accum: int = option(1, "Micro-batches per optimizer step; triage sees all of them together.")
    lr: float = option(1e-4, "Peak learning rate.")
    lr_scheduler: str = option("cosine", "Learning-rate schedule (any transformers scheduler name).")
    warmup_ratio: float = option(0.0, "Fraction of the steps used for linear warm-up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).")
    lora_r: int = option(0, "LoRA rank; 0 trains all weights (full fine-tuning).")
    lora_alpha: int = option(16, "LoRA alpha.")
    lora_dropout: float = option(0.0, "LoRA dropout.")
    lora_target: str = option("all-linear", "Modules that get LoRA adapters (comma-separated names or all-linear).")
    chunk_tokens: int = option(128, "Positions whose float32 log-probabilities are computed at once when scoring.")


@dataclass
class TrainConfig(OptimConfig, PruningConfig, DataConfig, ModelConfig):
    out: str = option(help="Output folder: checkpoints, step log, final model in OUT/model.", required=True)
    seed: int = option(0, "Seed for data order, initialisation of adapters and random baselines.")
    merge_lora: bool = option(False, "Merge LoRA adapters into the base weights when saving the final model.")
    save_steps: int = option(200, "Save a checkpoint every N optimizer steps.")
    save_total_limit: int = option(2, "Checkpoints kept on disk (oldest deleted first).")
    logging_steps: int = option(10, "Average and report the loss every N steps.")
    report_to: str = option("none", "Where transformers reports metrics: none, tensorboard, wandb, ...")
    resume: bool = option(False, "Resume from the last checkpoint in --out.")
    progress: bool = option(True, "Show a progress bar.")
