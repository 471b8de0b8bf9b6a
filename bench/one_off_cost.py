"""One-off costs against one full-data SFT epoch, side by side in one process (one thread, variants
alternating, medians): Token Cleaning's pass over the training set (model + reference, no grad)
and the LESS selector (warm-up, per-sample gradients, projection), both over the same random
subset of the testbed's training set as the epoch.

    OMP_NUM_THREADS=1 python one_off_cost.py TESTBED REFERENCE TARGET.jsonl SUBSET REPEATS OUT.json
"""

import copy
import dataclasses
import json
import statistics
import sys
import time

import torch

from qtune.config import SelectConfig, TrainConfig
from qtune.data import collate, length_bucketed_batches
from qtune.methods import build_method
from qtune.models import load_model, load_tokenizer
from qtune.samples import load_samples
from qtune.scorer import Scorer
from qtune.selectors.less import less_scores
from qtune.step import train_step

torch.set_num_threads(1)
testbed, reference_dir, target_path, subset, repeats, out = sys.argv[1:7]
subset, repeats = int(subset), int(repeats)
model_dir, data = f"{testbed}/model", f"{testbed}/train.jsonl"
tokenizer = load_tokenizer(model_dir)
pad = tokenizer.pad_token_id
_, samples = load_samples(TrainConfig(model=model_dir, data=data, out="o"), tokenizer)
chosen = torch.randperm(len(samples), generator=torch.Generator().manual_seed(1))[:subset].tolist()
part = [samples[i] for i in chosen]
target_records, target = load_samples(TrainConfig(model=model_dir, data=target_path, out="o"), tokenizer)
# The target's share of the subset as 64 targets are of the 3,000 training samples.
n_target = max(1, round(len(target) * subset / len(samples)))
target = [target[i] for i in range(n_target)]
base = load_model(model_dir, dtype="float32", device="cpu")
reference = load_model(reference_dir, dtype="float32", device="cpu").requires_grad_(False)
BATCH, ACCUM = 8, 2
less_cfg = SelectConfig(model=model_dir, data=data, out="o", selector="less", target_data=target_path,
                        less_lora_r=8, less_dim=1024)


def epoch():
    """Full-data SFT over the subset: length-grouped micro-batches of 8, steps of 2, AdamW."""
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    method = build_method("full", TrainConfig(model="m", data="d", out="o", method="full"))
    groups = length_bucketed_batches([len(s["input_ids"]) for s in part], BATCH, shuffle=True, seed=0)
    batches = [collate([part[i] for i in g], pad) for g in groups]
    for step, start in enumerate(range(0, len(batches), ACCUM)):
        train_step(model, batches[start:start + ACCUM], method, step, 0, pad_token_id=pad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def token_cleaning_pass():
    """What QTuneTrainer._pass_values does: length-grouped micro-batches of 8, model and reference."""
    scorer = Scorer(reference=reference)
    method = build_method("random+token_cleaning", TrainConfig(model="m", data="d", out="o", reference_model="r",
                                                               method="random+token_cleaning"))
    values = {}
    for group in length_bucketed_batches([len(s["input_ids"]) for s in part], BATCH):
        batch = collate([part[i] for i in group], pad)
        values.update(method.pass_values(batch, scorer(base, [batch])[0]))
    method.fix_masks(values)


def less():
    less_scores(copy.deepcopy(base), part, target, [{}] * len(target), less_cfg, pad)


variants = {"full_epoch": epoch, "token_cleaning_pass": token_cleaning_pass, "less": less}
seconds = {name: [] for name in variants}
cpu = {name: [] for name in variants}
for _ in range(repeats):
    for name, run in variants.items():
        start_cpu, start = time.process_time(), time.perf_counter()
        run()
        seconds[name].append(time.perf_counter() - start)
        cpu[name].append(time.process_time() - start_cpu)
med = {name: statistics.median(v) for name, v in seconds.items()}
med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
result = {"subset": subset, "target": n_target, "repeats": repeats, "threads": torch.get_num_threads(),
          "less": {k: v for k, v in dataclasses.asdict(less_cfg).items() if k.startswith("less_") or k == "batch_size"},
          "seconds": seconds, "cpu_seconds": cpu, "median_seconds": med, "median_cpu_seconds": med_cpu,
          "vs_full_epoch": {name: med[name] / med["full_epoch"] for name in variants},
          "cpu_vs_full_epoch": {name: med_cpu[name] / med_cpu["full_epoch"] for name in variants}}
json.dump(result, open(out, "w"), indent=1)
print(json.dumps(result, indent=1))
