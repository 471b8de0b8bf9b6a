"""Cost per step of token rules against full data on the testbed (CPU, one thread), side by side:
variants alternate within each repeat over the same steps; medians. Token Cleaning's masks come
from the pass of a real `qtune train` run (its OUT/qtune-token-masks.safetensors).

    OMP_NUM_THREADS=1 python step_cost_testbed.py TESTBED REFERENCE MASKS OUT.json
"""

import json
from pathlib import Path
import statistics
import sys
import time

import torch

from qtune.config import TrainConfig
from qtune.data import collate
from qtune.methods import build_method
from qtune.models import load_model, load_tokenizer
from qtune.samples import load_samples
from qtune.scorer import Scorer
from qtune.step import train_step
from qtune.train import read_token_masks

torch.set_num_threads(1)
testbed, reference_dir, masks_path, out = sys.argv[1:5]
model_dir, data = f"{testbed}/model", f"{testbed}/train.jsonl"
tokenizer = load_tokenizer(model_dir)
_, samples = load_samples(TrainConfig(model=model_dir, data=data, out="o"), tokenizer)
model = load_model(model_dir, dtype="float32", device="cpu")
reference = load_model(reference_dir, dtype="float32", device="cpu").requires_grad_(False)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
masks = read_token_masks(Path(masks_path))

BATCH, ACCUM, STEPS, REPEATS = 8, 2, 6, 5
order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
steps = [[collate([samples[i] for i in order[(s * ACCUM + a) * BATCH:(s * ACCUM + a + 1) * BATCH]], tokenizer.pad_token_id)
          for a in range(ACCUM)] for s in range(STEPS)]

names = ["full", "random+random", "random+token_cleaning", "random+rho1"]
methods = {}
for name in names:
    m = build_method(name, TrainConfig(model="m", data="d", out="o", method=name, r_sample=0.25, r_token=0.7))
    if m.pass_needs:
        m.use_masks(masks)
    methods[name] = m
scorers = {name: Scorer(reference=reference if "reference_nll" in methods[name].needs else None) for name in names}
times = {name: [] for name in names}
kept = {name: [0, 0] for name in names}
for repeat in range(REPEATS + 1):  # the first repeat warms up, not counted
    for s, batches in enumerate(steps):
        for name in names:
            model.train()
            start = time.perf_counter()
            plan, _ = train_step(model, batches, methods[name], step=s, total_steps=STEPS, pad_token_id=tokenizer.pad_token_id,
                                 scorer=scorers[name])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if repeat:
                times[name].append(time.perf_counter() - start)
                kept[name][0] += plan.record["kept_tokens"]
                kept[name][1] += plan.record["response_tokens"]
full = statistics.median(times["full"])
result = {"batch": BATCH, "grad_accum": ACCUM, "steps": STEPS, "repeats": REPEATS, "threads": torch.get_num_threads(),
          "r_sample": 0.25, "r_token": 0.7, "full_step_s": full,
          "methods": [{"method": n, "step_s": statistics.median(times[n]), "vs_full": statistics.median(times[n]) / full,
                       "loss_token_share": kept[n][0] / kept[n][1]} for n in names]}
json.dump(result, open(out, "w"), indent=1)
print(json.dumps(result, indent=1))
