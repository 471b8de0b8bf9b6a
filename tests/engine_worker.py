"""The runs of one launch of tests/test_engines.py (1 process, or 2 under torchrun), in order, each
in its folder under the spec's root, with the engine options of the spec (none: DDP or one
process). Every front end runs as a user runs it: `run_train`, a TRL script with
`QTuneSFTTrainer`, `run_rl`, and the `qtune` command for the runs whose exit status is tested.

    python engine_worker.py SPEC.json

A run that raises stops the launch (the test reads its stderr); a command run records each
process's exit status in `<run>/exit_status.<rank>`.
"""

import json
import os
import shutil
import sys
from pathlib import Path


def train(spec, out, **overrides):
    from qtune.config import TrainConfig
    from qtune.train import run_train

    run_train(TrainConfig(**{**spec["train"], **spec["engine"], "out": str(out), **overrides}))


def lora(spec, out):
    """LoRA on the RL testbed's model, which ties its output projection to its embedding."""
    train(spec, out, model=spec["rl"]["model"], lora_r=4, max_steps=2)


def resume(spec, out):
    """The `train` run again from its checkpoint-2 (copied with the run's files): it trains step 3."""
    import torch.distributed as dist

    done = out.parent / "train"
    if int(os.environ.get("RANK", 0)) == 0:
        out.mkdir(parents=True)
        shutil.copytree(done / "checkpoint-2", out / "checkpoint-2")
        for name in ("run_config.json", "steps.jsonl"):
            shutil.copy(done / name, out / name)
    if dist.is_initialized():  # by the train run before
        dist.barrier()
    train(spec, out, resume=True)


def token_cleaning(spec, out):
    """Token Cleaning: a pass over the training set with a reference model before the first step."""
    train(spec, out, method="random+token_cleaning", reference_model=spec["train"]["model"], max_steps=2)


def nonfinite_grads(spec, out):
    """At lr 1e4 the gradient norm is NaN from step 2 on: with --nonfinite skip no later step moves
    the weights, which stay those of a run of step 1 alone (beside OUT, in `<run>_first`)."""
    train(spec, out.parent / f"{out.name}_first", method="full", lr=1e4, max_steps=1)
    train(spec, out, method="full", lr=1e4, nonfinite="skip")


def nonfinite_scores(spec, out):
    """A NaN perplexity in each process's second scoring pass: step 2 is skipped for its scores, step 3
    trains (constant learning rate: a skipped step leaves the schedule where it is under DeepSpeed only)."""
    import qtune.scorer
    from faults import nan_scores_at

    score_batch = qtune.scorer.score_batch
    qtune.scorer.score_batch = nan_scores_at(2, score_batch)
    train(spec, out, nonfinite="skip", lr_scheduler="constant")
    qtune.scorer.score_batch = score_batch


def reuse(spec, out):
    """Two epochs with every score reused on a sample's second visit to a process, from the first of
    two decoder layers (the early exit)."""
    train(spec, out, max_steps=-1, epochs=2, rescore_drift=1e6, score_layers=1)


def trl(spec, out):
    """A TRL script: SFTConfig/SFTTrainer replaced by QTuneSFTConfig/QTuneSFTTrainer, prompt-completion data."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.trl_sft import QTuneSFTConfig, QTuneSFTTrainer

    rows = [json.loads(line) for line in Path(spec["train"]["data"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": f"Question: {r['question']}\nAnswer:", "completion": f" {r['answer']}"}
                                 for r in rows])
    t = spec["train"]
    processes = int(os.environ.get("WORLD_SIZE", 1))
    args = QTuneSFTConfig(output_dir=str(out), per_device_train_batch_size=t["batch_size"],
                          gradient_accumulation_steps=t.get("grad_accum", 1), max_steps=t["max_steps"],
                          learning_rate=t["lr"], logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                          use_cpu=True, seed=t["seed"], method=t["method"], r_sample=t["r_sample"],
                          r_token=t["r_token"], ddp_backend="gloo" if processes > 1 else None, **spec["engine"])
    model = AutoModelForCausalLM.from_pretrained(t["model"])
    trainer = QTuneSFTTrainer(model=model, args=args, train_dataset=dataset,
                              processing_class=AutoTokenizer.from_pretrained(t["model"]))
    trainer.train()
    trainer.save_model()


def rl(spec, out):
    """qtune rl, with held-out evaluation except under FSDP2 (which refuses it)."""
    from qtune.rl import RLConfig, run_rl

    values = {k: v for k, v in spec["rl"].items() if "fsdp" not in spec["engine"] or not k.startswith("eval_")}
    run_rl(RLConfig(**{**values, **spec["engine"], "out": str(out)}))


def rl_lora(spec, out):
    """qtune rl from the `lora` run's adapter with a KL term (a frozen `ref` copy of the adapter),
    saved merged into the base weights."""
    from qtune.rl import RLConfig, run_rl

    values = {**{k: v for k, v in spec["rl"].items() if not k.startswith("eval_")},
              "model": str(out.parent / "lora" / "model"), "beta": 0.1, "merge_lora": True}
    run_rl(RLConfig(**{**values, **spec["engine"], "out": str(out)}))


def command(spec, out, argv):
    """`qtune ARGV --out OUT` as the command line runs it; each process's exit status in
    OUT/exit_status.<rank>."""
    from qtune.cli import main

    status = main([*argv, "--out", str(out)])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"exit_status.{os.environ.get('RANK', 0)}").write_text(str(status))


def fsdp_asked(spec, out):
    """--fsdp where accelerate cannot give FSDP (a CPU run): refused before the first step."""
    t = spec["train"]
    command(spec, out, ["train", "--model", t["model"], "--data", t["data"], "--max-steps", "1", "--no-progress",
                        "--fsdp", "full_shard auto_wrap", "--fsdp-config", spec["fsdp_config"]])


def failing_save(spec, out):
    """A run whose gathering of the trained weights fails on process 1 only."""
    from accelerate import Accelerator

    gathered = Accelerator.get_state_dict

    def fails_on_process_1(self, model, unwrap=True):
        if self.process_index == 1:
            raise RuntimeError("simulated: out of memory while gathering")
        return gathered(self, model, unwrap)

    Accelerator.get_state_dict = fails_on_process_1
    t = spec["train"]
    command(spec, out, ["train", "--model", t["model"], "--data", t["data"], "--max-steps", "1", "--no-progress",
                        "--batch-size", "4"])
    Accelerator.get_state_dict = gathered


RUNS = {"train": train, "lora": lora, "resume": resume, "token_cleaning": token_cleaning, "trl": trl, "rl": rl,
        "rl_lora": rl_lora, "nonfinite_grads": nonfinite_grads, "nonfinite_scores": nonfinite_scores, "reuse": reuse,
        "fsdp_asked": fsdp_asked, "failing_save": failing_save}

if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    for name in spec["runs"]:
        RUNS[name](spec, Path(spec["root"]) / name)
