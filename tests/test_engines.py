"""Engines (`qtune.engine`, docs/distributed.md): 2 CPU processes over gloo train under DDP, FSDP2,
DeepSpeed ZeRO-2 and ZeRO-3 what one process trains, for every front end (`qtune train`,
`QTuneSFTTrainer`, `qtune rl`), with the shipped example configs (examples/distributed/).

Each engine is one launch (`runs`, module-scoped): its runs follow each other in the same two
processes (tests/engine_worker.py), and the tests read their folders. Against one process on the
same global batches (2 processes x 1 micro-batch against 1 x 2, the sampler groups by length over
the global batch; see tests/test_distributed.py): the same kept ids and losses within 1e-5.
Against the DDP launch: OUT/model loads with `from_pretrained` and holds the same weights within
1e-4 (full fine-tuning, LoRA, merged), and --resume ends where the straight run ends. The defects
these engines had are tested where they lived: FSDP asked for where accelerate runs DDP, a save
whose gathering fails, ZeRO-3 with Token Cleaning's pass and reference model, --nonfinite skip
under DeepSpeed, score reuse and the early exit under sharding, generation out of step under ZeRO-3.

DeepSpeed (the `deepspeed` extra, installed by `make test`) runs on its CPU accelerator; its first
launch builds one communication op (once per virtual environment, `launch_env`). FSDP2 runs on CPU
only through a test-only switch (tests/fsdp_on_cpu/sitecustomize.py: accelerate gives FSDP only to
accelerator processes). `make test` launches DDP, ZeRO-3 and FSDP2; the ZeRO-2 launch and a
pipeline under ZeRO-3 are marked `matrix`, deselected by default: `make test-engines` runs the
whole file (`pytest -m 'matrix or not matrix' tests/test_engines.py`).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import COMMON, TIMEOUT
from test_rl import rl_config, testbed  # noqa: F401 (testbed is a fixture)
from test_train import SRC, tiny_run_inputs  # noqa: F401 (tiny_run_inputs is a fixture)

from qtune.train import read_step_log

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples" / "distributed"
ENGINES = {
    "ddp": {},
    "fsdp2": {"fsdp": "full_shard auto_wrap", "fsdp_config": str(EXAMPLES / "fsdp2.json")},
    "zero2": {"deepspeed": str(EXAMPLES / "ds_zero2.json")},
    "zero3": {"deepspeed": str(EXAMPLES / "ds_zero3.json")},
}
SLOW = {"fsdp2", "zero2"}
#: The runs of each engine's launch (tests/engine_worker.py); DDP's also hold the refusals.
RUNS = ["train", "resume", "lora", "trl", "rl", "rl_lora", "token_cleaning", "nonfinite_grads", "nonfinite_scores",
        "reuse"]
DDP_ONLY = ["fsdp_asked", "failing_save"]

def launch_env(*paths: str) -> dict:
    """The environment of a launched process: qtune's sources and `paths` importable, one thread.
    DeepSpeed's JIT-built op is kept with the virtual environment (built once per environment):
    the default folder, ~/.cache/torch_extensions, is shared with other environments, whose own
    DeepSpeed sources make each other rebuild it."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch-extensions"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, *paths, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": extensions}


def launch(root: Path, spec: dict, processes: int, *, fsdp_on_cpu: bool = False) -> subprocess.CompletedProcess:
    """Run tests/engine_worker.py on `spec` in `processes` processes (torchrun when more than one)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(json.dumps({**spec, "root": str(root)}))
    env = launch_env(str(TESTS), *([str(TESTS / "fsdp_on_cpu")] if fsdp_on_cpu else []))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), str(TESTS / "engine_worker.py"),
               str(root / "spec.json")]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT * 3)


def completed(runs, engine: str, name: str) -> Path:
    """The folder of run `name` of `engine`'s launch; fails with the launch's stderr when the run did
    not finish (a run that raised stops the launch)."""
    root, done = runs(engine)
    folder = root / name
    finished = any((folder / name).exists() for name in ("summary.json", "exit_status.0", "model"))
    assert finished, f"{engine}/{name} did not finish (exit {done.returncode}):\n{done.stderr[-6000:]}"
    return folder


@pytest.fixture(scope="module")
def spec(tiny_run_inputs, testbed):  # noqa: F811 (fixtures)
    model, data = tiny_run_inputs
    rl = rl_config(testbed, "unused", batch_size=4, save_steps=1, rewards=("test_rl:text_length",), limit=16,
                   filter_zero_variance=True, eval_data=str(testbed.test_path), eval_limit=3, eval_batch_size=1,
                   eval_max_new_tokens=8)
    rl_values = {k: getattr(rl, k) for k in ("model", "data", "max_steps", "num_generations", "batch_size",
                                              "max_completion_length", "lr", "save_steps", "progress", "seed",
                                              "limit", "filter_zero_variance", "eval_data", "eval_limit",
                                              "eval_batch_size", "eval_max_new_tokens")}
    return {"train": dict(model=str(model), data=str(data), **COMMON, save_steps=2, logging_steps=1, progress=False),
            "rl": {**rl_values, "rewards": list(rl.rewards)}, "fsdp_config": ENGINES["fsdp2"]["fsdp_config"]}


@pytest.fixture(scope="module")
def runs(spec, tmp_path_factory):
    """engine -> (its launch's folder, the finished launch), each engine launched once for the module:
    2 processes x 1 micro-batch, or "one": 1 process x 2 micro-batches, the same global batches."""
    done = {}

    def get(engine: str):
        if engine not in done:
            root = tmp_path_factory.mktemp(engine)
            if engine == "one":
                one = {**spec, "train": {**spec["train"], "grad_accum": 2}, "engine": {}, "runs": ["train", "trl"]}
                done[engine] = root, launch(root, one, 1)
            else:
                runs_of = RUNS + (DDP_ONLY if engine == "ddp" else [])
                done[engine] = root, launch(root, {**spec, "engine": ENGINES[engine], "runs": runs_of}, 2,
                                            fsdp_on_cpu=engine == "fsdp2")
        return done[engine]

    return get


def steps(folder: Path) -> list[dict]:
    return read_step_log(folder / "steps.jsonl")


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a saved model folder as `from_pretrained` loads them (an adapter folder: the base
    model with the adapter applied)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_weights(got: dict, want: dict, tolerance: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance, msg=name)


SHARDED = ["zero3", "fsdp2", pytest.param("zero2", marks=pytest.mark.matrix)]
EVERY = ["ddp", *SHARDED]


# --- every front end, every engine ---------------------------------------------------------------


@pytest.mark.parametrize("engine", EVERY)
def test_qtune_train_keeps_what_one_process_keeps(runs, engine):
    """Kept ids and token masks equal to one process's on the same global batches, losses within
    1e-5, the engine and processes in summary.json."""
    one, mine = completed(runs, "one", "train"), completed(runs, engine, "train")
    reference, rows = steps(one), steps(mine)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(reference, rows):
        assert b["sample_ids"] == a["sample_ids"] and b["kept_ids"] == a["kept_ids"]
        assert b["kept_token_masks"] == a["kept_token_masks"] and b["kept"] == 4
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    summary = json.loads((mine / "summary.json").read_text())
    assert (summary["engine"], summary["processes"]) == (engine, 2)
    single = json.loads((one / "summary.json").read_text())
    assert (single["engine"], single["processes"]) == ("single", 1)


@pytest.mark.parametrize("engine", EVERY)
def test_trl_front_end_keeps_what_one_process_keeps(runs, engine):
    """QTuneSFTTrainer in a TRL script: the same kept ids and losses as one process, and its
    `trainer.save_model()` gathers the full model under the engine."""
    reference, rows = steps(completed(runs, "one", "trl")), steps(completed(runs, engine, "trl"))
    assert len(rows) == 3
    for a, b in zip(reference, rows):
        assert b["kept_ids"] == a["kept_ids"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert_same_weights(model_weights(completed(runs, engine, "trl") / "model"),
                        model_weights(completed(runs, "one", "trl") / "model"))


@pytest.mark.parametrize("engine", SHARDED)
@pytest.mark.parametrize("run", ["train", "lora", "trl", "rl", "rl_lora"])
def test_out_model_loads_and_matches_ddp(runs, engine, run):
    """OUT/model under a sharded engine loads with from_pretrained and holds the DDP run's weights
    within 1e-4: full fine-tuning (`train`, `trl`, `rl`), a LoRA adapter (`lora`), and qtune rl
    from that adapter with a KL term, merged (`rl_lora`). Tied weights are written once."""
    from safetensors import safe_open

    folder = completed(runs, engine, run) / "model"
    assert_same_weights(model_weights(folder), model_weights(completed(runs, "ddp", run) / "model"))
    file = folder / ("adapter_model.safetensors" if run == "lora" else "model.safetensors")
    with safe_open(str(file), framework="pt") as f:
        names = set(f.keys())
    if run == "lora":
        assert names and all(".lora_" in n for n in names)  # the adapter alone
    else:
        assert not any("lora" in n for n in names)  # rl_lora: merged, TRL's `ref` copy left out
    if run in ("rl", "rl_lora"):  # the testbed's model ties its output projection to its embedding
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@pytest.mark.parametrize("engine", EVERY)
def test_rl_trains_what_ddp_trains(runs, engine):
    """qtune rl: the zero-variance pre-pass's verdicts (the main process generating alone, under
    ZeRO-3 with the start model's weights gathered), rewards and losses as under DDP; held-out
    accuracy after the last step, each process generating its share (2 and 1 records, one at a time:
    the processes generate out of step; under ZeRO-3 with the weights gathered; refused under
    FSDP2, tested in test_rl.py)."""
    verdicts = [json.loads((completed(runs, e, "rl") / "zero_variance.json").read_text()) for e in (engine, "ddp")]
    assert verdicts[0]["groups"] == verdicts[1]["groups"] and verdicts[0]["prompts"] == 16
    rows, reference = steps(completed(runs, engine, "rl")), steps(completed(runs, "ddp", "rl"))
    assert [r["step"] for r in rows] == [1, 2]
    for a, b in zip(reference, rows):
        assert b["reward"] == a["reward"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    if engine != "fsdp2":
        assert rows[-1]["heldout_exact_match"] == reference[-1]["heldout_exact_match"]
    summary = json.loads((completed(runs, engine, "rl") / "summary.json").read_text())
    assert (summary["engine"], summary["processes"]) == (engine, 2)


@pytest.mark.parametrize("engine", EVERY)
def test_resume_continues_to_the_same_weights(runs, engine):
    """The `train` run resumed from its checkpoint-2 (the engine's own checkpoint format) trains step
    3 as the straight run did and ends on the same weights."""
    straight, resumed = completed(runs, engine, "train"), completed(runs, engine, "resume")
    assert [r["kept_ids"] for r in steps(resumed)] == [r["kept_ids"] for r in steps(straight)]
    assert steps(resumed)[-1]["loss"] == pytest.approx(steps(straight)[-1]["loss"], rel=1e-6)
    assert_same_weights(model_weights(resumed / "model"), model_weights(straight / "model"), 1e-6)


# --- the defects ---------------------------------------------------------------------------------


def test_fsdp_asked_where_accelerate_runs_ddp_is_refused(runs):
    """--fsdp on CPU processes (accelerate never turns them into FSDP): one line before the first step."""
    folder = completed(runs, "ddp", "fsdp_asked")
    assert [(folder / f"exit_status.{rank}").read_text() for rank in (0, 1)] == ["2", "2"]
    line = ("error: FSDP was asked for (--fsdp) but accelerate runs this job as ddp: it gives FSDP only to GPU (or "
            "other accelerator) processes, never to a CPU run; on CPU use DDP or DeepSpeed (--deepspeed), see "
            "docs/distributed.md\n")
    assert line in runs("ddp")[1].stderr  # (both processes print it, possibly interleaved)
    assert not (folder / "steps.jsonl").exists() and not list(folder.glob("checkpoint-*"))


def test_a_save_that_cannot_gather_fails_every_process_and_writes_nothing(runs):
    """Gathering the weights fails on process 1 only: both processes exit 2 with the same line, and
    neither OUT/model nor a partial one nor summary.json is written."""
    folder = completed(runs, "ddp", "failing_save")
    assert [(folder / f"exit_status.{rank}").read_text() for rank in (0, 1)] == ["2", "2"]
    line = (f"error: saving {folder / 'model'}: gathering the trained weights failed on process 1 (RuntimeError: "
            "simulated: out of memory while gathering); no model was written (the checkpoints are complete: "
            "--resume continues from the last one)\n")
    assert line in runs("ddp")[1].stderr
    assert not (folder / "model").exists() and not (folder / ".model.tmp").exists()
    assert not (folder / "summary.json").exists() and (folder / "checkpoint-1").is_dir()


@pytest.mark.parametrize("engine", SHARDED)
def test_token_cleaning_pass_and_reference_model_under_sharding(runs, engine):
    """Token Cleaning scores the training set with the model and a reference model before the first
    step (ZeRO-3 partitions both at load): the masks and kept ids are DDP's."""
    mine, reference = completed(runs, engine, "token_cleaning"), completed(runs, "ddp", "token_cleaning")
    masks = [load_file(str(f / "qtune-token-masks.safetensors")) for f in (mine, reference)]
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert [r["kept_ids"] for r in steps(mine)] == [r["kept_ids"] for r in steps(reference)]
    assert "training_set_pass_seconds" in json.loads((mine / "summary.json").read_text())


@pytest.mark.parametrize("engine", EVERY)
def test_nonfinite_skip_leaves_the_weights(runs, engine):
    """--nonfinite skip: steps with NaN gradients leave the weights of the step before them (under
    DeepSpeed, its own skip), and a step with a NaN score trains nothing while the steps around it
    train as under DDP."""
    grads = completed(runs, engine, "nonfinite_grads")
    rows = steps(grads)
    assert [r["skipped"] for r in rows] == [False, True, True] and math.isfinite(rows[0]["grad_norm"])
    first = completed(runs, engine, "nonfinite_grads_first")
    assert_same_weights(model_weights(grads / "model"), model_weights(first / "model"), 0)

    scores = completed(runs, engine, "nonfinite_scores")
    rows = steps(scores)
    assert [r["skipped"] for r in rows] == [False, True, False] and rows[1]["kept_ids"] == []
    assert json.loads((scores / "summary.json").read_text())["skipped_steps"] == 1
    assert_same_weights(model_weights(scores / "model"),
                        model_weights(completed(runs, "ddp", "nonfinite_scores") / "model"))


@pytest.mark.parametrize("engine", SHARDED)
def test_score_reuse_and_early_exit_under_sharding(runs, engine):
    """Scores reused on a sample's second visit to a process, from the first decoder layer: in some
    step one process has every row cached while the other scores afresh, and still joins its
    scoring forward (a sharded forward is a collective); the decisions are DDP's."""
    rows, reference = steps(completed(runs, engine, "reuse")), steps(completed(runs, "ddp", "reuse"))
    assert [r["kept_ids"] for r in rows] == [r["kept_ids"] for r in reference]
    assert [r["reused_scores"] for r in rows] == [r["reused_scores"] for r in reference]
    seen, uneven = [set(), set()], 0
    for r in rows:
        shares = [r["sample_ids"][:8], r["sample_ids"][8:]]
        cached = [set(share) <= seen[p] for p, share in enumerate(shares)]
        uneven += cached[0] != cached[1]
        for p, share in enumerate(shares):
            seen[p] |= set(share)
    assert uneven > 0


# --- the contract's parts, in one process --------------------------------------------------------


def test_the_engine_asked_for_must_be_the_engine_running():
    from qtune.engine import GATHER_16BIT, engine_refusal

    assert engine_refusal(None, "ddp") is None and engine_refusal(None, "single") is None
    assert engine_refusal(("fsdp2", "--fsdp"), "fsdp2") is None
    assert engine_refusal(("fsdp2", "--fsdp"), "ddp").startswith(
        "FSDP was asked for (--fsdp) but accelerate runs this job as ddp")
    assert engine_refusal(("fsdp1", "the accelerate config (FSDP)"), "fsdp1").startswith(
        "FSDP1 is not one of qtune's engines")
    assert engine_refusal(None, "zero1", {"zero_optimization": {"stage": 1}}).startswith(
        "DeepSpeed ZeRO stage 1 is not one of qtune's engines: use stage 2")
    assert engine_refusal(("zero3", "--deepspeed ds.json"), "ddp") == (
        "DeepSpeed ZeRO-3 was asked for (--deepspeed ds.json) but this job runs as ddp")
    zero3 = {"zero_optimization": {"stage": 3}}
    assert engine_refusal(("zero3", "--deepspeed ds.json"), "zero3", zero3).startswith(
        f"DeepSpeed ZeRO-3 without {GATHER_16BIT}: the trained model could not be gathered")
    assert engine_refusal(("zero3", "--deepspeed ds.json"), "zero3",
                          {"zero_optimization": {"stage": 3, GATHER_16BIT: True}}) is None
    # The shipped ZeRO-3 config gathers on save.
    shipped = json.loads(Path(ENGINES["zero3"]["deepspeed"]).read_text())
    assert engine_refusal(("zero3", "--deepspeed"), "zero3", shipped) is None


def test_what_a_run_asks_for_comes_from_its_options_or_its_launcher(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from qtune.engine import requested_engine

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                 "ACCELERATE_DEEPSPEED_CONFIG_FILE", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    plain = SimpleNamespace(deepspeed=None, fsdp=False, fsdp_plugin_args=None)
    assert requested_engine(plain) is None
    flags = SimpleNamespace(deepspeed="ds.json", fsdp=False, fsdp_plugin_args=None,
                            hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": 3}}))
    assert requested_engine(flags) == ("zero3", "--deepspeed ds.json")
    fsdp = SimpleNamespace(deepspeed=None, fsdp=True, fsdp_plugin_args={"fsdp_version": 2})
    assert requested_engine(fsdp) == ("fsdp2", "--fsdp")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --config_file fsdp.yaml
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert requested_engine(plain) == ("fsdp2", "the accelerate config (FSDP)")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", ENGINES["zero2"]["deepspeed"])
    assert requested_engine(plain) == ("zero2", "the accelerate config (DeepSpeed)")


def test_a_run_leaves_the_process_as_it_found_it(monkeypatch):
    """accelerate sets ACCELERATE_USE_DEEPSPEED for a --deepspeed run and never unsets it, and
    transformers partitions every model loaded while a ZeRO-3 config is registered: after
    `engine_scope`, neither holds, so the next stage of a pipeline loads and runs as asked."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from qtune.engine import engine_scope

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # a launcher's, kept
    with engine_scope():
        config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled() and config
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ and os.environ["ACCELERATE_USE_FSDP"] == "true"


def test_deepspeed_without_a_launcher_is_refused_before_anything_loads(tiny_run_inputs, tmp_path, monkeypatch):
    from qtune.config import TrainConfig
    from qtune.errors import QTuneError
    from qtune.train import run_train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, data = tiny_run_inputs
    cfg = TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "run"),
                      deepspeed=ENGINES["zero3"]["deepspeed"])
    with pytest.raises(QTuneError, match=r"^--deepspeed needs a launcher, also for one process: torchrun "):
        run_train(cfg)
    assert not (tmp_path / "run").exists()


def test_written_weights_are_checked_against_the_model(tmp_path):
    from safetensors.torch import save_file

    from qtune.engine import check_saved_weights
    from qtune.errors import QTuneError

    expected = {"embed.weight": (6, 4), "head.weight": (6, 4), "norm.weight": (4,)}
    target = tmp_path / "model"
    save_file({"embed.weight": torch.ones(6, 4), "norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    check_saved_weights(tmp_path, expected, target)  # the tied head saved once: fine
    save_file({"embed.weight": torch.ones(0), "norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(QTuneError, match=rf"^the model written for {target} has embed.weight of shape \[0\], not the "
                                         r"model's \[6, 4\]: the weights were not gathered whole; nothing was saved$"):
        check_saved_weights(tmp_path, expected, target)  # a ZeRO-3 partition saved without gathering
    save_file({"other.weight": torch.ones(0)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(QTuneError, match="has an empty other.weight"):
        check_saved_weights(tmp_path, expected, target)
    save_file({"other.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(QTuneError, match="holds none of the model's weights"):
        check_saved_weights(tmp_path, expected, target)


def test_tied_weights_are_written_once_under_their_first_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtune.engine import _tied_weights_once

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}  # gathered: separate tensors
    assert "lm_head.weight" in state and "lm_head.weight" not in _tied_weights_once(model, state)
    assert _tied_weights_once(model, state).keys() == state.keys() - {"lm_head.weight"}


def test_a_process_with_every_score_cached_still_runs_a_forward_in_lockstep(tiny_model_dir):
    """Under FSDP2 and ZeRO-3 a forward is a collective: with `lockstep`, a micro-batch whose rows
    are all cached runs one (its scores unused); without, none. The scores are the cached ones."""
    from qtune.models import load_model
    from qtune.scorer import Scorer
    from test_train import make_batch

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    batch = make_batch([6, 9, 7], vocab=300)
    for lockstep, runs_when_cached in ((False, 0), (True, 1)):
        scorer = Scorer(rescore_drift=1e6, lockstep=lockstep)
        first = scorer(model, [batch])[0]
        scorer.moved(0.0, 1.0)
        forwards.clear()
        again = scorer(model, [batch])[0]
        assert len(forwards) == runs_when_cached and scorer.reused == 3
        torch.testing.assert_close(again.ppl, first.ppl)


def test_weight_drift_over_shards_sums_each_process_part():
    """Where each process holds a shard (a ZeRO-3 partition here), the drift meter measures the
    shards and sums over processes (one process: its shard is everything)."""
    from qtune.engine import local_shards
    from qtune.scorer import DriftMeter

    param = torch.nn.Parameter(torch.empty(0))
    param.ds_tensor = torch.tensor([3.0, 0.0])  # what ZeRO-3 leaves on this process
    model = torch.nn.Module()
    model.register_parameter("w", param)
    meter = DriftMeter(shards=local_shards)
    meter.before(model)
    param.ds_tensor += torch.tensor([0.0, 4.0])
    assert meter.after(model) == pytest.approx((4.0, 5.0))


@pytest.mark.matrix
def test_a_pipeline_with_a_zero3_stage_runs_its_other_stages_on_whole_models(tiny_run_inputs, tmp_path):
    """qtune pipeline under torchrun with one process (DeepSpeed needs a launcher): selection, SFT
    under ZeRO-3, then the evaluations, whose models load whole again after the ZeRO-3 stage."""
    model, data = tiny_run_inputs
    out = tmp_path / "pipeline"
    config = {"out": str(out), "model": str(model), "data": str(data), "eval_data": str(data),
              "allow_contamination": True,  # the tiny run evaluates on its training records
              "select": {"selector": "perplexity", "ratio": 0.5},
              "sft": {"method": "qtuning", "max_steps": 2, "batch_size": 4, "progress": False,
                      "deepspeed": ENGINES["zero3"]["deepspeed"]},
              "eval": {"limit": 4, "max_new_tokens": 8}}
    (tmp_path / "pipeline.json").write_text(json.dumps(config))  # YAML's superset: JSON
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "qtune.cli", "pipeline", "--config", str(tmp_path / "pipeline.json")],
                          env=launch_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "sft" / "summary.json").read_text())["engine"] == "zero3"
    stages = [row["stage"] for row in json.loads((out / "report.json").read_text())["stages"]]
    assert stages == ["base", "select", "sft"] and (out / "eval-sft" / "metrics.json").exists()
