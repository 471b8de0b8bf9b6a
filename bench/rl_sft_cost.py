"""Seconds per `qtune rl` step with and without SFT inside RL (docs/rl.md, "SFT inside RL"), side by
side on one machine: GRPO, CHORD-mu, CHORD-phi and ReLIFT run in turn, 3 rounds of 4 steps, and the
work each adds is timed where it runs (generation, the training step, the interleaved SFT step).

    OMP_NUM_THREADS=1 python bench/rl_sft_cost.py "$(qtune testbed build | sed -n 's/^model: //p' | xargs dirname)" runs/rl-sft-cost
"""
import collections
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from qtune.rl import RLConfig, run_rl
from qtune.rl.trainer import QTuneGRPOTrainer
from qtune.run_log import read_step_log

TB, OUT = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(OUT, ignore_errors=True)
BASE = dict(model=str(TB / "model"), data=str(TB / "dev.jsonl"), limit=128, rewards=("exact_match",),
            num_generations=8, batch_size=64, max_steps=4, lr=2e-5, lr_scheduler="constant", temperature=0.7,
            max_completion_length=160, save_steps=100, progress=False, seed=0)
VARIANTS = {"grpo": {}, "chord-mu": dict(sft_weight=0.9, sft_weight_schedule="decay"),
            "chord-phi": dict(sft_weight=0.1, sft_token_weight="p(1-p)"),
            "relift": dict(interleave_sft=True, interleave_sft_batch=16)}
TIMES = collections.defaultdict(float)


def timed(name, method):
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start
    return wrapper


QTuneGRPOTrainer.training_step = timed("training_step", QTuneGRPOTrainer.training_step)
QTuneGRPOTrainer._generate_and_score_completions = timed("generation", QTuneGRPOTrainer._generate_and_score_completions)
QTuneGRPOTrainer.interleaved_sft_step = timed("interleaved_sft_step", QTuneGRPOTrainer.interleaved_sft_step)

results = collections.defaultdict(list)
for repeat in range(3):
    for name, extra in VARIANTS.items():
        TIMES.clear()
        out = OUT / f"{name}-{repeat}"
        run_rl(RLConfig(**BASE, **extra, out=str(out)))
        rows = read_step_log(out / "steps.jsonl")
        results[name].append({"step_s": [r["seconds"] for r in rows], **TIMES,
                              "sft_records": sum(r.get("interleaved_sft_records", 0) for r in rows),
                              "completion_tokens": sum(r["completion_tokens"] for r in rows)})
for name, runs in results.items():
    steps = [s for r in runs for s in r["step_s"]]
    n = len(steps)
    train = sum(r["training_step"] - r["generation"] for r in runs) / n
    print(json.dumps({"variant": name, "median_step_s": round(statistics.median(steps), 2),
                      "mean_step_s": round(statistics.mean(steps), 2),
                      "generation_s_per_step": round(sum(r["generation"] for r in runs) / n, 2),
                      "forward_backward_s_per_step": round(train, 3),
                      "interleaved_sft_s_total": round(sum(r.get("interleaved_sft_step", 0) for r in runs), 2),
                      "interleaved_sft_records": sum(r["sft_records"] for r in runs),
                      "completion_tokens": sum(r["completion_tokens"] for r in runs)}))
