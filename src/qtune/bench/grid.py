"""The grid of `qtune bench`: its options (`BenchConfig`) and its cells, methods x budgets x seeds."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import OptimConfig, TokenPruningConfig, check_device, option
from ..errors import QTuneError

DEFAULT_BUDGETS = "0.125x0.5,0.125x0.7,0.25x0.5,0.25x0.7,0.5x0.5,0.5x0.7"
FULL = "full"


@dataclass
class BenchConfig(OptimConfig, TokenPruningConfig):
    """Options of `qtune bench`. Training and evaluation options are passed to every cell."""

    out: str = option("runs/bench", "Output folder: cells/, results.jsonl, results.md, results.csv, plots/, "
                                    "report.html.")
    model: str | None = option(None, "Base model (local folder or hub id); default: the testbed's tiny model.")
    data: str | None = option(None, "Training data file; default: the testbed's training set.")
    eval_data: str | None = option(None, "Held-out evaluation data (GSM8K-style answers); default: the "
                                         "testbed's test set.")
    # The grid.
    methods: str | None = option(None, "Comma-separated pruning methods; default: every registered method "
                                       "(full runs once per seed, the others once per budget and seed).")
    budgets: str = option(DEFAULT_BUDGETS, "Comma-separated budgets r_sample x r_token, e.g. 0.25x0.7,0.125x0.5.")
    seeds: str = option("0,1,2", "Comma-separated training seeds.")
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


#: Options that choose which cells run and how results are reported: changing them between two runs


@dataclass(frozen=True)
class Cell:
    """One training and evaluation run of the grid. `full` has r_sample = r_token = 1."""

    method: str
    r_sample: float
    r_token: float
    seed: int

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. qtuning-r0.25x0.7-seed1 or full-seed0."""
        if self.method == FULL:
            return f"{FULL}-seed{self.seed}"
        return f"{self.method}-r{self.r_sample:g}x{self.r_token:g}-seed{self.seed}"

    @property
    def label(self) -> str:
        if self.method == FULL:
            return f"{FULL} seed={self.seed}"
        return f"{self.method} r_sample={self.r_sample:g} r_token={self.r_token:g} seed={self.seed}"


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


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2], duplicates dropped."""
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise QTuneError(f"--seeds: {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise QTuneError("--seeds: no seed given")
    return list(dict.fromkeys(seeds))


def parse_methods(text: str | None) -> list[str]:
    """The methods to run, `full` first; every registered method when `text` is None."""
    from ..methods import METHODS

    names = list(METHODS) if text is None else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise QTuneError(f"--methods: unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(METHODS))}")
    if not names:
        raise QTuneError("--methods: no method given")
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda m: m != FULL)


def build_grid(methods: list[str], budgets: list[tuple[float, float]], seeds: list[int]) -> list[Cell]:
    """Seed by seed (so an early stop still has complete seeds), full first, then budget by budget."""
    cells = []
    for seed in seeds:
        if FULL in methods:
            cells.append(Cell(FULL, 1.0, 1.0, seed))
        for r_sample, r_token in budgets:
            cells.extend(Cell(m, r_sample, r_token, seed) for m in methods if m != FULL)
    return cells
