"""Pretrain the saturated preset's base model from scratch: the model that ships with qtune.

    OMP_NUM_THREADS=1 python -m qtune.testbed.rebuild OUT [--threads 1] [--probe-every 300] [--set FIELD=VALUE ...]

Writes the model folder OUT (model.safetensors, config.json, tokenizer files) for
`PRESETS["saturated"].recipe`, recipe fields replaced by `--set` (a test runs it with a few steps),
and prints the sha256 of the pinned files beside the shipped ones (`qtune.testbed.shipped.SHA256`).
Training on CPU at one thread is deterministic, so the preset's recipe at `--threads 1` should
give the shipped files byte for byte; another thread count gives a model of the same quality, not
the same bytes. To ship a new model, copy OUT over src/qtune/testbed/weights/saturated and put the
printed hashes in `shipped.SHA256` (the cache key follows them). Time: docs/testbed.md.

`--probe-every N` prints, every N steps, a JSON line with the model's arithmetic (50 random facts
per operator) and its textbook-layout accuracy on the first 100 test problems (the functions of
`qtune.testbed.probe`): the learning curve of docs/testbed.md. Probing draws no random numbers and
leaves the weights as they would be without it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qtune.testbed import shipped
from qtune.testbed.model import PRESETS, pretrain_saturated, save_model
from qtune.testbed.probe import arithmetic_probe, replace_fields, textbook_hits
from qtune.testbed.saturated import make_splits


def learning_curve_probe(every: int, started: float):
    """An `after_step` hook printing the probe every `every` steps (on a copy of the tokenizer, whose
    padding side the probe changes)."""
    test = make_splits(PRESETS["saturated"].config)[2][:100]

    def probe(step: int, model, tokenizer) -> None:
        if step % every:
            return
        tokenizer = copy.deepcopy(tokenizer)
        model.eval()
        arithmetic = arithmetic_probe(model, tokenizer, PRESETS["saturated"].config.max_value, facts=50)
        hits = textbook_hits(model, tokenizer, test)
        model.train()
        print(json.dumps({"step": step, "seconds": round(time.perf_counter() - started), "arithmetic": arithmetic,
                          "textbook": sum(hits) / len(hits)}), flush=True)

    return probe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="model folder to write (must not exist)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe-every", type=int, default=0, metavar="N",
                        help="print the A0 probe every N steps (0: never)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="replace a ModelRecipe field")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new folder")
    torch.set_num_threads(args.threads)
    recipe = replace_fields(args.set, PRESETS["saturated"].recipe)
    started = time.perf_counter()
    hook = learning_curve_probe(args.probe_every, started) if args.probe_every > 0 else None
    model, tokenizer = pretrain_saturated(recipe, PRESETS["saturated"].config, after_step=hook)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(model, tokenizer, work / "model", progress=True)
        os.replace(work / "model", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s at {args.threads} thread(s)")
    for name, pinned in shipped.SHA256.items():
        digest = shipped.file_sha256(out / name)
        print(f"{name}: {digest} ({'matches the shipped file' if digest == pinned else 'differs from the shipped ' + pinned})")


if __name__ == "__main__":
    main()
