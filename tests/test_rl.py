"""`qtune rl`: GRPO (TRL's GRPOTrainer) from an SFT output, on a tiny testbed model.

The tiny testbed (the testbed's generator, tokenizer and Llama at a few thousand parameters) is
built once per module. Its untrained model never ends a 16-token completion, so the built-in
rewards give every group one value; the tests add rewards with spread, named by import path
(`test_rl:...`), as a user's own rewards are.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from qtune.config import TrainConfig
from qtune.errors import DataError, OptionError, QTuneError
from qtune.rl import RLConfig, run_rl
from qtune.rl.prompts import load_prompts, without_added_bos
from qtune.rl.trainer import QTuneGRPOTrainer
from qtune.rl.zero_variance import zero_variance
from qtune.testbed import ModelRecipe, TestbedConfig, build_testbed
from qtune.train import read_step_log, run_train

TINY_RECIPE = ModelRecipe(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=256,
                          block_size=64, batch_size=2, steps=3, warmup_steps=1, tokenizer_documents=100,
                          vocab_size=400)
TINY_DATA = TestbedConfig(train_size=40, test_size=10)


def text_length(completions, **kwargs):
    """A reward with spread on an untrained model: the completion's length in characters / 100."""
    return [len(c) / 100 for c in completions]


def even_ids_constant(completions, sample_id, **kwargs):
    """1 for every completion of an even-numbered prompt (a group without spread), the text length
    for the others."""
    return [1.0 if s % 2 == 0 else len(c) / 100 for c, s in zip(completions, sample_id)]


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    return build_testbed(tmp_path_factory.mktemp("testbed"), preset="data-starved", recipe=TINY_RECIPE,
                         config=TINY_DATA, progress=False)


def rl_config(testbed, out, **overrides) -> RLConfig:
    values = dict(model=str(testbed.model_dir), data=str(testbed.train_path), out=str(out), max_steps=2,
                  num_generations=4, batch_size=8, max_completion_length=16, lr=1e-2, save_steps=100,
                  rewards=("exact_match", "answer_format", "length_penalty=0.5", "test_rl:text_length"),
                  progress=False, seed=0)
    values.update(overrides)
    return RLConfig(**values)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").exists()
                                   else "model.safetensors")))


def test_grpo_steps_change_the_weights_and_log_rewards(testbed, tmp_path):
    out = tmp_path / "rl"
    summary = run_rl(rl_config(testbed, out, eval_data=str(testbed.test_path), eval_steps=1, eval_limit=4,
                               eval_max_new_tokens=8, report_to="tensorboard"))
    start, end = weights(testbed.model_dir), weights(out / "model")
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    rows = read_step_log(out / "steps.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name in ("exact_match", "answer_format", "length_penalty", "text_length"):
            assert f"rewards/{name}/mean" in row and f"rewards/{name}/std" in row
        assert row["rewards/length_penalty/mean"] <= 0 and row["rewards/text_length/std"] > 0
        assert row["completion_tokens"] == 8 * row["completions/mean_length"]  # 2 prompts x 4 completions
        assert 0 <= row["zero_variance_groups"] <= 2 and row["seconds"] > 0
        assert 0 <= row["heldout_exact_match"] <= 1  # eval_steps 1: every step
    assert summary["steps"] == 2 and summary["heldout_exact_match"] == rows[-1]["heldout_exact_match"]
    assert summary["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert json.loads((out / "summary.json").read_text())["rl_seconds"] == pytest.approx(summary["rl_seconds"])
    # The same metrics, through report_to.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(out.glob("runs/*/events.out.tfevents.*"))))
    events.Reload()
    assert {"train/rewards/text_length/mean", "train/reward_std", "train/frac_reward_zero_std",
            "train/heldout_exact_match"} <= set(events.Tags()["scalars"])


def test_resume_after_a_kill_continues_the_run(testbed, tmp_path, monkeypatch):
    settings = dict(max_steps=4, save_steps=1, rewards=("test_rl:text_length",))
    whole = tmp_path / "whole"
    run_rl(rl_config(testbed, whole, **settings))

    killed = tmp_path / "killed"
    save = QTuneGRPOTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 2:
            raise KeyboardInterrupt  # killed right after checkpoint-2 was written

    monkeypatch.setattr(QTuneGRPOTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_rl(rl_config(testbed, killed, **settings))
    monkeypatch.undo()
    before = read_step_log(killed / "steps.jsonl")
    assert [r["step"] for r in before] == [1, 2] and not (killed / "model").exists()
    with pytest.raises(QTuneError, match="already holds checkpoints"):
        run_rl(rl_config(testbed, killed, **settings))

    run_rl(rl_config(testbed, killed, resume=True, **settings))
    after = read_step_log(killed / "steps.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert after[:2] == before  # steps 1 and 2 were not trained again
    state = json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # The resumed run restored weights, optimizer, schedule, data position and RNG: it ends where an
    # uninterrupted run ends.
    reference, resumed = weights(whole / "model"), weights(killed / "model")
    assert all(torch.allclose(reference[k], resumed[k], atol=1e-6) for k in reference)
    assert [r["reward"] for r in read_step_log(whole / "steps.jsonl")] == pytest.approx([r["reward"] for r in after])


def test_a_lora_sft_output_is_accepted_as_the_start(testbed, tmp_path):
    sft = tmp_path / "sft"
    run_train(TrainConfig(model=str(testbed.model_dir), data=str(testbed.train_path), out=str(sft), method="full",
                          lora_r=4, max_steps=1, batch_size=4, lr=1e-2, progress=False))
    assert (sft / "model" / "adapter_config.json").exists()
    out = tmp_path / "rl"
    # The qtune train folder itself is accepted (its model/), and beta > 0 keeps a frozen copy of the
    # adapter as the KL reference.
    summary = run_rl(rl_config(testbed, out, model=str(sft), beta=0.1, rewards=("test_rl:text_length",)))
    assert summary["adapter"]
    assert (out / "model" / "adapter_config.json").exists() and not (out / "model" / "ref").exists()
    start, end = weights(sft / "model"), weights(out / "model")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    rows = read_step_log(out / "steps.jsonl")
    assert all("kl" in r for r in rows)

    merged = tmp_path / "merged"
    run_rl(rl_config(testbed, merged, model=str(sft / "model"), max_steps=1, merge_lora=True,
                     rewards=("test_rl:text_length",)))
    assert (merged / "model" / "model.safetensors").exists()
    assert weights(merged / "model").keys() == weights(testbed.model_dir).keys()


def test_zero_variance_groups_are_found():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, float("nan"), 0.5],
                            [float("nan"), 2.0, float("nan")], [0.2, 0.2 + 1e-9, 0.2]])
    assert zero_variance(rewards).tolist() == [True, True, False, True, True, True]


def test_the_zero_variance_filter_drops_the_flat_groups_and_counts_them(testbed, tmp_path):
    out = tmp_path / "filtered"
    summary = run_rl(rl_config(testbed, out, max_steps=1, filter_zero_variance=True,
                               rewards=("test_rl:even_ids_constant",)))
    report = json.loads((out / "zero_variance.json").read_text())
    flat = [g["sample_id"] for g in report["groups"] if not g["kept"]]
    assert flat == [i for i in range(TINY_DATA.train_size) if i % 2 == 0]
    assert report["dropped"] == 20 and report["kept"] == 20 and report["dropped_by_reward"] == {"1": 20}
    assert summary["prompts"] == 20 and summary["zero_variance"]["dropped"] == 20
    assert summary["filter_seconds"] == report["seconds"] > 0
    assert summary["wall_seconds"] == pytest.approx(summary["rl_seconds"] + summary["filter_seconds"])
    with pytest.raises(QTuneError, match="every prompt's group earned one reward"):
        run_rl(rl_config(testbed, tmp_path / "nothing-left", filter_zero_variance=True, rewards=("exact_match",)))


def test_options_are_checked_before_anything_loads(testbed, tmp_path):
    with pytest.raises(OptionError, match="rewards must be one or more rewards.*unknown reward 'exact'"):
        rl_config(testbed, tmp_path, rewards=("exact",))
    with pytest.raises(OptionError, match="not a number"):
        rl_config(testbed, tmp_path, rewards=("exact_match=high",))
    with pytest.raises(OptionError, match="eval_data must be a file of held-out problems"):
        rl_config(testbed, tmp_path, eval_steps=5)
    with pytest.raises(OptionError, match="num_generations must be at least 2"):
        rl_config(testbed, tmp_path, num_generations=1)
    with pytest.raises(QTuneError, match="GRPO refuses these options: generation_batch_size \\(6\\) must be divisible"):
        run_rl(rl_config(testbed, tmp_path / "out", batch_size=6))


def test_missing_optional_engines_are_named_before_out_is_touched(testbed, tmp_path):
    import os
    import subprocess
    import sys

    from test_train import SRC

    out = tmp_path / "vllm"
    with pytest.raises(QTuneError, match=r"--use-vllm needs vLLM, which is not installed: pip install 'trl\[vllm\]'"):
        run_rl(rl_config(testbed, out, use_vllm=True))
    assert not out.exists()
    # Without TRL (hidden from the import system), the command says how to get it, in one line.
    script = ("import sys; sys.modules['trl'] = None; from qtune.cli import main; "
              f"sys.exit(main(['rl', '--model', {str(testbed.model_dir)!r}, '--data', {str(testbed.train_path)!r}, "
              f"'--out', {str(tmp_path / 'no-trl')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC},
                          timeout=120)
    assert done.returncode == 2 and done.stderr == "error: qtune rl needs TRL: pip install 'qtune[trl]'\n"
    assert not (tmp_path / "no-trl").exists()


def test_held_out_evaluation_is_refused_when_the_processes_hold_shards(testbed, tmp_path, monkeypatch):
    import qtune.rl.trainer

    monkeypatch.setattr(qtune.rl.trainer, "check_engine", lambda args, accelerator: "fsdp2")  # as under FSDP2
    with pytest.raises(QTuneError, match="which FSDP2 shards: leave eval_data unset"):
        run_rl(rl_config(testbed, tmp_path / "sharded", eval_data=str(testbed.test_path), eval_limit=2))
    run_rl(rl_config(testbed, tmp_path / "no-eval", max_steps=1))  # without held-out evaluation it trains


def test_prompts_need_a_checkable_answer(testbed, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(testbed.model_dir)
    prompts = load_prompts(testbed.train_path, tokenizer, limit=3)
    first = json.loads(testbed.train_path.read_text().splitlines()[0])
    assert prompts.sample_id == [0, 1, 2] and prompts.answer[0] == first["answer"].split("#### ")[-1]
    assert prompts.prompt[0].startswith("<s><|user|>\n" + first["question"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n"
                   + json.dumps({"question": "2 + 2?", "answer": "four"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, record 2: the reference answer has no '#### N' line"):
        load_prompts(bad, tokenizer)
    assert load_prompts(bad, tokenizer, skip_invalid=True).answer == ["2"]


def test_a_tokenizer_that_adds_bos_gets_the_prompt_without_the_rendered_one(tiny_tokenizer):
    import copy

    from tokenizers import processors

    adds = copy.deepcopy(tiny_tokenizer)
    adds.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", adds.bos_token_id)])
    assert adds("x")["input_ids"][0] == adds.bos_token_id
    assert without_added_bos("<s><|user|>hi", adds) == "<|user|>hi"
    assert without_added_bos("<s><|user|>hi", tiny_tokenizer) == "<s><|user|>hi"


def test_the_command_reports_a_bad_option_in_one_line(testbed, tmp_path, capsys):
    from qtune.cli import main

    base = ["rl", "--model", str(testbed.model_dir), "--data", str(testbed.train_path), "--out", str(tmp_path / "o")]
    assert main(base + ["--num-generations", "1"]) == 2
    assert capsys.readouterr().err == "error: --num-generations must be at least 2; got 1\n"
    (tmp_path / "rl.yaml").write_text("rewards: [exact_match, nope]\n")
    assert main(base + ["--config", str(tmp_path / "rl.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: rewards in ") and "unknown reward 'nope'" in err and len(err.splitlines()) == 1
