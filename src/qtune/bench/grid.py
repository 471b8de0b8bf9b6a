"""The grid of `qtune bench`: its options (`BenchConfig`) and its cells, methods x budgets x seeds."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import (ComputeConfig, ContaminationConfig, InfoBatchConfig, LossConfig, OptimConfig,
                      PerplexitySampleConfig, PerplexityTokenConfig, QTuningAblationConfig, ReferenceModelConfig,
                      ScorerConfig, TokenPruningConfig, UdsConfig, check_device, option)
from ..errors import QTuneError

DEFAULT_BUDGETS = "0.125x0.5,0.125x0.7,0.25x0.5,0.25x0.7,0.5x0.5,0.5x0.7"
FULL = "full"
#: Methods that train on records fixed by the data, not on a budget: they run once per seed (cell
#: `<method>-seed<seed>`, r_sample = r_token = 1 in its row), and the reports show this label in
#: place of the budget. Their option classes have neither r_sample nor r_token (a test checks it).
BUDGET_FREE = {FULL: "full data", "oracle": "clean data"}
#: Methods whose cell reads the training run of another method's cell of the same budget and seed,
#: and therefore runs after it: token_matched_random keeps as many loss tokens as Q-Tuning did
#: (`match_run`: the qtuning cell's train folder).
MATCHED = {"token_matched_random": "qtuning"}
#: The testbed presets (`qtune.testbed.PRESETS`, default `DEFAULT_PRESET`), written out here
#: because importing the testbed loads transformers, which `qtune --help` must not (a test checks
#: that they agree).
TESTBED_PRESETS = ("data-starved", "saturated")
DEFAULT_TESTBED = "saturated"


@dataclass
class BenchConfig(ContaminationConfig, ScorerConfig, ComputeConfig, LossConfig, OptimConfig, QTuningAblationConfig,
                  TokenPruningConfig, PerplexitySampleConfig, InfoBatchConfig, UdsConfig, PerplexityTokenConfig,
                  ReferenceModelConfig):
    """Options of `qtune bench`. Training and evaluation options, and the options of the sample and
    token rules (`qtune methods`), are passed to every cell. On user data (--data or --eval-data
    given) the training data is checked against the evaluation data before any cell trains
    (`ContaminationConfig`)."""

    out: str = option("runs/bench", "Output folder: cells/, results.jsonl, results.md, results.csv, plots/, "
                                    "report.html.")
    model: str | None = option(None, "Base model (a known name, local folder, .gguf file or hub id, as qtune "
                                     "train's --model takes it); default: the testbed's tiny model.")
    data: str | None = option(None, "Training data file; default: the testbed's training set.")
    eval_data: str | None = option(None, "Held-out evaluation data (GSM8K-style answers); default: the "
                                         "testbed's test set.")
    testbed: str = option(DEFAULT_TESTBED, "Testbed preset (qtune testbed build --preset) whose model, training "
                                           "set and test set stand in for --model, --data and --eval-data when "
                                           "they are not given. Given as a flag or in YAML, its calibrated "
                                           "settings (epochs, lr, batch size, warm-up, evaluation) become the "
                                           "defaults of the options not given.", choices=list(TESTBED_PRESETS))
    # The grid.
    methods: str | None = option(None, "Comma-separated pruning methods; default: every registered method but "
                                       "the controls (full and oracle run once per seed, the others once per "
                                       "budget and seed; token_matched_random needs qtuning).")
    budgets: str = option(DEFAULT_BUDGETS, "Comma-separated budgets r_sample x r_token, e.g. 0.25x0.7,0.125x0.5.")
    seeds: str = option("0,1,2", "Comma-separated training seeds.")
    data_seeds: str = option("0", "Comma-separated draws of the testbed's data (qtune testbed build --data-seed): "
                                  "each draw has its own training, dev and test sets (same generator and defect "
                                  "mix), and every cell runs on each. The tables pool draws x training seeds and "
                                  "show the spread across draws beside the spread across training seeds. Only "
                                  "with the testbed's data (neither --data nor --eval-data); 0 is the preset's "
                                  "own draw.")
    jobs: int = option(1, "Cells run at once, each in its own process with cpu_count // jobs torch threads.",
                       bounds="[1, inf)")
    # Reports.
    report_only: bool = option(False, "Only rebuild the reports from OUT/results.jsonl; train nothing.")
    metric: str = option("strict", "Exact-match filter the reports rank and plot by.", choices=["strict", "flexible"])
    examples: int = option(3, "Q2 samples shown with their pruned tokens in report.html (0: none).",
                           bounds="[0, inf)")
    plots: bool = option(True, "Draw the plots and score the training set with the base model for the EU-plane "
                               "figures and the token examples (needs matplotlib).")
    keep_models: bool = option(False, "Keep each cell's trained model in OUT/cells/<cell>/train/model "
                                      "(deleted once evaluated by default).")
    keep_models_of: str | None = option(None, "Keep the trained models of this method's cells only (e.g. qtuning), "
                                              "in OUT/cells/<cell>/train/model; the others are deleted once "
                                              "evaluated.")
    # Model and data, as in `qtune train`.
    dtype: str = option("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.",
                        choices=["auto", "float32", "bfloat16"])
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:N.", check=check_device)
    trust_remote_code: bool = option(False, "Run code shipped with the model. Off unless you trust its source.")
    pad_token: str | None = option(None, "Token to use for padding when the tokenizer has none (e.g. its EOS).")
    format: str = option("auto", "Record format of the training data; the evaluation data's is detected.",
                         choices=["auto", "alpaca", "prompt_completion", "question_answer", "messages", "sharegpt"])
    max_length: int = option(1024, "Maximum tokens per sample, in training and perplexity; longer ones are cut.",
                             bounds="[2, inf)")
    limit: int | None = option(None, "Train on the first N training records only.", bounds="[1, inf)")
    # Evaluation, as in `qtune eval`.
    max_new_tokens: int = option(256, "Most tokens generated per evaluation question.", bounds="[1, inf)")
    eval_batch_size: int = option(16, "Prompts generated at once in evaluation.", bounds="[1, inf)")
    eval_limit: int | None = option(None, "Evaluate on the first N evaluation records only.", bounds="[1, inf)")
    num_fewshot: int = option(0, "Solved training examples prepended to each evaluation prompt.", bounds="[0, inf)")
    perplexity: bool = option(True, "Also compute the held-out perplexity of the reference answers.")


def preset_defaults(given: dict) -> dict:
    """The calibrated settings of the testbed preset that the given options name (`testbed`, as a
    flag or in YAML): `PRESETS[name].sft_settings`, the defaults of `qtune bench --testbed NAME`
    for every option not given, so that no config or script repeats them. Empty when no preset is
    named (or an unknown one, which the config then refuses)."""
    if given.get("testbed") not in TESTBED_PRESETS:
        return {}
    from ..testbed import PRESETS

    return dict(PRESETS[given["testbed"]].sft_settings)


def budget_label(method: str, r_sample: float, r_token: float) -> str:
    """How tables and figures name the budget of a (method, r_sample, r_token): e.g. "0.25x0.7", or
    "full data" for `full` (`BUDGET_FREE`)."""
    return BUDGET_FREE.get(method) or f"{r_sample:g}x{r_token:g}"


@dataclass(frozen=True)
class Cell:
    """One training and evaluation run of the grid. The budget-free methods (`BUDGET_FREE`: full,
    oracle) have r_sample = r_token = 1. `data_seed`: the draw of the testbed's data it runs on
    (0, the preset's own draw, for a bench on user data)."""

    method: str
    r_sample: float
    r_token: float
    seed: int
    data_seed: int = 0

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. qtuning-r0.25x0.7-seed1, or full-seed0 for a budget-free
        method; another draw than 0 adds its seed (qtuning-r0.25x0.7-data2-seed1), so that a run
        on draw 0 alone keeps its names when other draws are added to it."""
        draw = f"-data{self.data_seed}" if self.data_seed else ""
        if self.method in BUDGET_FREE:
            return f"{self.method}{draw}-seed{self.seed}"
        return f"{self.method}-r{self.r_sample:g}x{self.r_token:g}{draw}-seed{self.seed}"

    @property
    def label(self) -> str:
        draw = f" data_seed={self.data_seed}" if self.data_seed else ""
        if self.method in BUDGET_FREE:
            return f"{self.method}{draw} seed={self.seed}"
        return f"{self.method} r_sample={self.r_sample:g} r_token={self.r_token:g}{draw} seed={self.seed}"

    @property
    def source(self) -> Cell | None:
        """The cell whose training run this one reads (`MATCHED`: the qtuning cell of the same
        budget, seed and draw for token_matched_random), None for the others."""
        method = MATCHED.get(self.method)
        return None if method is None else Cell(method, self.r_sample, self.r_token, self.seed, self.data_seed)


def parse_budgets(text: str) -> list[tuple[float, float]]:
    """'0.25x0.7,0.125x0.5' -> [(0.25, 0.7), (0.125, 0.5)], each ratio in (0, 1], duplicates dropped."""
    budgets = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pieces = part.lower().split("x")
        try:
            r_sample, r_token = (float(p) for p in pieces)
        except ValueError:
            raise QTuneError(f"--budgets: {part!r} is not r_samplexr_token (e.g. 0.25x0.7)") from None
        if not (0 < r_sample <= 1 and 0 < r_token <= 1):
            raise QTuneError(f"--budgets: {part!r}: both ratios must be in (0, 1]")
        if (r_sample, r_token) not in budgets:
            budgets.append((r_sample, r_token))
    if not budgets:
        raise QTuneError("--budgets: no budget given")
    return budgets


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """'0,1,2' -> [0, 1, 2], duplicates dropped; `option` names the flag in errors."""
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise QTuneError(f"{option}: {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise QTuneError(f"{option}: no seed given")
    return list(dict.fromkeys(seeds))


def is_control(method: str) -> bool:
    """Whether `method` is a control of experiments (`Method.control`: `oracle_ratio`,
    `oracle_ratio+random`, ...), which bounds the methods and is never the best of a budget; a
    name no longer registered is not."""
    from ..methods import method_class

    try:
        return method_class(method).control
    except QTuneError:
        return False


def parse_methods(text: str | None) -> list[str]:
    """The methods to run, `full` first; every registered method but the controls when `text` is None.
    A name may also combine a sample rule and a token rule ("longest+perplexity", docs/methods.md)."""
    from ..config import composed_parts, method_choices
    from ..methods import METHODS

    names = ([m for m, cls in METHODS.items() if not cls.control] if text is None
             else [m.strip() for m in text.split(",") if m.strip()])
    unknown = [m for m in names if m not in METHODS and composed_parts(m) is None]
    if unknown:
        raise QTuneError(f"--methods: unknown method(s) {', '.join(unknown)}; available: {method_choices()}")
    if not names:
        raise QTuneError("--methods: no method given")
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda m: m != FULL)


def build_grid(methods: list[str], budgets: list[tuple[float, float]], seeds: list[int],
               data_seeds: list[int] = (0,)) -> list[Cell]:
    """Draw by draw, and in each seed by seed (so an early stop still has complete seeds): the
    budget-free methods once (full first), then budget by budget the others, a cell that reads
    another's run (`MATCHED`) after it. QTuneError when such a cell's source method is not among
    `methods`."""
    for method in methods:
        source = MATCHED.get(method)
        if source is not None and source not in methods:
            raise QTuneError(f"--methods: {method} keeps as many loss tokens as the {source} cell of the same budget "
                             f"and seed did, so it needs {source} in --methods too (finished {source} cells are "
                             "reused, not run again)")
    free = [m for m in methods if m in BUDGET_FREE]
    budgeted = sorted((m for m in methods if m not in BUDGET_FREE), key=lambda m: m in MATCHED)  # stable
    cells = []
    for data_seed in data_seeds:
        for seed in seeds:
            cells.extend(Cell(m, 1.0, 1.0, seed, data_seed) for m in free)
            for r_sample, r_token in budgets:
                cells.extend(Cell(m, r_sample, r_token, seed, data_seed) for m in budgeted)
    return cells
