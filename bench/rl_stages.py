"""Issue 14: does a cheaper SFT start cost anything after RL? SFT -> RL -> evaluate from three starts.

    OMP_NUM_THREADS=1 python bench/rl_stages.py [--out runs/rl-stages] [--preset NAME] [--seeds 0,1,2]
                                                [--starts full,qtuning,random] [--filter-start random]
                                                [--sft-in-rl chord-phi,relift] [--sft-in-rl-starts full,qtuning]
                                                [--rl '{max_steps: 60}']
    python bench/rl_stages_report.py [OUT]       (the tables; the runner prints them at the end too)

For every seed and start, one `qtune pipeline` in OUT/seed<S>/<start>: SFT on the preset's
training set with the preset's calibrated settings (full data, or qtuning / random at 25% of the
samples x 50% of the tokens), held-out exact match after it, the same RL stage (RL below) on
problems with checkable answers, held-out exact match after it. For one start (--filter-start) a
second RL stage from the same SFT model with the zero-variance pre-pass on, OUT/seed<S>/<start>-
filtered (an rl-only pipeline), against the first: accuracy, wall time, prompts dropped. With
--sft-in-rl, for each of --sft-in-rl-starts one more RL stage per variant of SFT_IN_RL (CHORD,
ReLIFT) from the same SFT model, OUT/seed<S>/<start>-<variant>, against the plain GRPO stage.

The RL prompts (OUT/rl_prompts.jsonl) are the preset's dev split when it has one, else clean
problems from the preset's generator drawn with another seed, none of whose questions is in the
training or the test set. Resumable: a second run skips finished stages (`qtune pipeline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from qtune.pipeline import PipelineConfig, run_pipeline
from qtune.testbed import DEFAULT_PRESET, PRESETS, TestbedConfig, build_testbed, make_test_set, write_jsonl

#: The sample and token budget of the pruned starts (README grid's 0.25 x 0.5 cell).
BUDGET = {"r_sample": 0.25, "r_token": 0.5}
#: The RL stage of every start: GRPO, 8 prompts x 8 completions per step, 30 steps, reward =
#: exact match alone (so a zero-variance group is one all right or all wrong). Chosen on 200 other
#: fresh problems, never the test set (docs/rl.md, "How the RL stage was chosen").
RL = {
    "rewards": ["exact_match"],
    "num_generations": 8,
    "batch_size": 64,
    "max_steps": 30,
    "lr": 2e-5,
    "lr_scheduler": "constant",
    "temperature": 0.7,
    "max_completion_length": 160,
    "beta": 0.0,
    "save_steps": 10,
    "progress": False,
}
RL_PROMPTS = 256
#: SFT inside RL (docs/rl.md, "SFT inside RL"): the qtune rl options each variant adds to RL, run from
#: the same SFT model as the plain GRPO stage (OUT/seed<S>/<start>-<variant>, rl-only pipelines).
#: CHORD-phi: the paper's final method (mu 0.1 throughout, token weight p(1-p)); ReLIFT: an SFT step
#: each time 8 all-wrong prompts are buffered (one RL step's prompts, the "fine-tuning batch size"
#: of the paper's text: the released script's 64 would not fill in 30 steps from a start that
#: solves most prompts). Fixed before any of these runs (docs/rl.md).
SFT_IN_RL = {
    "chord-phi": {"sft_weight": 0.1, "sft_token_weight": "p(1-p)"},
    "relift": {"interleave_sft": True, "interleave_sft_batch": 8},
}


def rl_prompts(paths, preset: str, out: Path) -> Path:
    """OUT/rl_prompts.jsonl (written once): RL_PROMPTS problems with correct references, disjoint
    from the training and test sets (see the module doc)."""
    path = out / "rl_prompts.jsonl"
    if path.exists():
        return path
    if paths.dev_path is not None:
        records = [json.loads(line) for line in paths.dev_path.read_text().splitlines()[:RL_PROMPTS]]
    else:
        config = PRESETS[preset].config
        assert isinstance(config, TestbedConfig)
        seen = {json.loads(line)["question"] for p in (paths.train_path, paths.test_path)
                for line in p.read_text().splitlines()}
        drawn = make_test_set(dataclasses.replace(config, seed=config.seed + 1, test_size=2 * RL_PROMPTS))
        records = [r for r in drawn if r["question"] not in seen][:RL_PROMPTS]
    write_jsonl(records, path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/rl-stages")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--starts", default="full,qtuning,random")
    parser.add_argument("--filter-start", default="random", help="The start whose RL stage is also run with the "
                                                                 "zero-variance pre-pass ('' for none).")
    parser.add_argument("--sft-in-rl", default="", help="Comma list of SFT_IN_RL variants run from the "
                                                        "--sft-in-rl-starts ('' for none).")
    parser.add_argument("--sft-in-rl-starts", default="full,qtuning")
    parser.add_argument("--rl", default="{}", help="A YAML mapping of qtune rl options that replace RL's.")
    ns = parser.parse_args(argv)
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = build_testbed(preset=ns.preset, progress=False)
    settings = PRESETS[ns.preset].sft_settings
    prompts = rl_prompts(paths, ns.preset, out)
    rl = {**RL, **(yaml.safe_load(ns.rl) or {}), "data": str(prompts)}
    evaluation = {"max_new_tokens": settings["max_new_tokens"], "batch_size": settings["eval_batch_size"],
                  "perplexity": False}
    sft_options = {k: settings[k] for k in ("epochs", "lr", "batch_size", "warmup_ratio")}
    # The testbed's splits share the generator's templates by construction (13-gram overlap), as
    # qtune bench knows; the questions themselves are disjoint (docs/testbed.md).
    testbed = {"eval_data": str(paths.test_path), "eval_base": False, "allow_contamination": True}
    for seed in [int(s) for s in ns.seeds.split(",")]:
        for start in ns.starts.split(","):
            folder = out / f"seed{seed}" / start
            budget = {} if start == "full" else BUDGET
            sft = {**sft_options, "method": start, "seed": seed, "progress": False, **budget}
            run_pipeline(PipelineConfig(out=str(folder), model=str(paths.model_dir), data=str(paths.train_path),
                                        **testbed, sft=sft,
                                        rl={**rl, "seed": seed}, eval=evaluation))
            if start == ns.filter_start:
                run_pipeline(PipelineConfig(out=str(out / f"seed{seed}" / f"{start}-filtered"),
                                            model=str(folder / "sft" / "model"), data=str(prompts),
                                            **testbed,
                                            rl={**rl, "seed": seed, "filter_zero_variance": True}, eval=evaluation))
            if start in ns.sft_in_rl_starts.split(","):
                for variant in filter(None, ns.sft_in_rl.split(",")):
                    run_pipeline(PipelineConfig(out=str(out / f"seed{seed}" / f"{start}-{variant}"),
                                                model=str(folder / "sft" / "model"), data=str(prompts),
                                                **testbed,
                                                rl={**rl, "seed": seed, **SFT_IN_RL[variant]}, eval=evaluation))
    from rl_stages_report import report

    print(report(out))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
