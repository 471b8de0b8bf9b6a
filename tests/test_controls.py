"""The controls of experiments (`qtune.methods.oracle`, `qtune.methods.token_matched`): what each
keeps per step, determinism per (seed, step), the token-matched fraction, labels and their errors,
and a training run with the oracle."""

import json
import random

import pytest
import torch
from datasets import Dataset
from test_train import make_batch, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)
from test_trl import messages_dataset
from test_trl import train as train_trl

from qtune.bench import parse_methods
from qtune.cli import main
from qtune.config import TrainConfig
from qtune.errors import OptionError, QTuneError
from qtune.methods import METHODS, build_method, response_mask_of
from qtune.pruning import keep_count
from qtune.scoring import DatasetScores
from qtune.step import plan_step
from qtune.train import read_step_log, run_train
from qtune.trl_sft import _metadata_by_id


def config(**values) -> TrainConfig:
    return TrainConfig(model="m", data="d", out="o", **values)


def step_batches(lengths_per_batch, seed=0):
    """Micro-batches of the given row lengths; micro-batch j's sample ids are 100 j, 100 j + 1, ..."""
    return [make_batch(lengths, seed=seed + j) | {"sample_id": torch.arange(len(lengths)) + 100 * j}
            for j, lengths in enumerate(lengths_per_batch)]


def bound(name, defective_ids, ids=range(400), **options):
    """Method `name` bound to records `ids`, those in `defective_ids` defective."""
    method = build_method(name, config(method=name, **options))
    method.bind_records({i: {"defective": i in defective_ids, "category": "x"} for i in ids})
    return method


def kept_ids(decision, batches) -> list[int]:
    return [int(b["sample_id"][r]) for b, s in zip(batches, decision.selections) for r in s.rows.tolist()]


def test_controls_are_registered_marked_and_left_out_of_the_default_bench(capsys):
    controls = {"oracle", "oracle_ratio", "anti_oracle", "token_matched_random"}
    assert {m for m, cls in METHODS.items() if cls.control} == controls
    assert {m for m, cls in METHODS.items() if cls.needs_metadata} == controls - {"token_matched_random"}
    assert not controls & set(parse_methods(None)) and parse_methods("oracle,full") == ["full", "oracle"]
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = [line.split()[0] for line in lines if line.split()[1] == "Control:"]
    assert marked == [line.split()[0] for line in lines[-len(controls):]] == sorted(controls)  # listed last


# --- oracle --------------------------------------------------------------------------------------


def test_oracle_keeps_exactly_the_clean_rows_and_all_their_tokens():
    batches = step_batches([[9, 12, 7, 11], [8, 10, 6]])
    oracle = bound("oracle", {1, 3, 101}, ids=[0, 1, 2, 3, 100, 101, 102])
    decision = oracle.select(batches, None, 0)
    assert [s.rows.tolist() for s in decision.selections] == [[0, 2], [0, 2]]
    assert kept_ids(decision, batches) == [0, 2, 100, 102]
    for batch, selection in zip(batches, decision.selections):
        assert torch.equal(selection.label_mask[selection.rows], response_mask_of(batch)[selection.rows])
    assert decision.stats == {"samples": 7, "kept": 4, "defective": 3, "kept_defective": 0}
    assert oracle.nominal_budget == pytest.approx(4 / 7)  # the clean share of the records


def test_a_step_without_a_clean_sample_trains_a_zero_weight_placeholder():
    batches = step_batches([[9, 12], [8, 10]])
    plan = plan_step(batches, None, bound("oracle", {0, 1, 100, 101}), 0, pad_token_id=0)
    assert plan.record["kept"] == 0 and plan.record["kept_tokens"] == 0 and plan.loss_tokens == 1
    assert all(not m["loss_weight"].any() for m in plan.micro_batches)  # one placeholder row each


def test_oracle_static_selection_keeps_the_clean_records_whole():
    scores = DatasetScores(sample_id=[3, 5, 8], n_response=[4, 2, 6], ppl=[1.0] * 3, ent=[0.5] * 3,
                           token_nll=None, token_entropy=None, seconds=0.0, tokens=0)
    chosen = bound("oracle", {5}).select_dataset(scores)
    assert chosen.sample_ids == [3, 8] and chosen.token_masks == {3: [True] * 4, 8: [True] * 6}


# --- oracle_ratio and anti_oracle ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["oracle_ratio", "anti_oracle"])
def test_ratio_controls_keep_keep_count_samples_preferred_first(name):
    batches = step_batches([[9, 12, 7, 11, 6, 8], [8, 10, 6, 9, 7, 5]])  # 12 samples
    ids = [int(i) for b in batches for i in b["sample_id"]]
    defective = set(ids[:5])  # 5 defective, 7 clean
    preferred = defective if name == "anti_oracle" else set(ids) - defective
    for r_sample, seed in [(0.25, 0), (0.5, 1), (0.75, 2)]:
        method = bound(name, defective, r_sample=r_sample, seed=seed)
        count = keep_count(r_sample, 12)  # 3, 6, 9
        for step in range(6):
            decision = method.select(batches, None, step)
            kept = kept_ids(decision, batches)
            assert len(kept) == count == decision.stats["kept"]
            assert len(set(kept) & preferred) == min(count, len(preferred))  # the others only when they run out
            assert kept_ids(method.select(batches, None, step), batches) == kept  # deterministic per (seed, step)
            for batch, selection in zip(batches, decision.selections):
                assert torch.equal(selection.label_mask, response_mask_of(batch))  # every token
    draws = {tuple(kept_ids(bound(name, defective, r_sample=0.25).select(batches, None, s), batches)) for s in range(6)}
    assert len(draws) > 1  # the order among the preferred changes with the step


def test_oracle_ratio_without_defects_draws_like_random():
    batches = step_batches([[9, 12, 7, 11], [8, 10, 6, 9]])
    oracle = bound("oracle_ratio", set(), r_sample=0.5, seed=4)
    rand = build_method("random", config(r_sample=0.5, r_token=1.0, seed=4))
    for step in range(4):
        assert kept_ids(oracle.select(batches, None, step), batches) == kept_ids(rand.select(batches, None, step),
                                                                                 batches)


@pytest.mark.parametrize("name", ["oracle_ratio", "anti_oracle"])
def test_the_ratio_controls_as_sample_rules_prune_tokens_inside_the_same_samples(name):
    batches = step_batches([[9, 12, 7, 11, 6, 8], [8, 10, 6, 9, 7, 5]])
    ids = [int(i) for b in batches for i in b["sample_id"]]
    defective = set(ids[:5])
    whole = bound(name, defective, r_sample=0.25, seed=3)
    same = bound(f"{name}+all", defective, r_sample=0.25, seed=3)
    pruned = bound(f"{name}+random", defective, r_sample=0.25, r_token=0.5, seed=3)
    assert same.control and pruned.control and pruned.needs_metadata and pruned.nominal_budget == 0.125
    for step in range(4):
        reference = whole.select(batches, None, step)
        for method in (same, pruned):
            decision = method.select(batches, None, step)
            # The same samples: the rule draws first from the step's generator, as the method does.
            assert kept_ids(decision, batches) == kept_ids(reference, batches)
            assert {k: decision.stats[k] for k in ("kept", "defective", "kept_defective")} == {
                k: reference.stats[k] for k in ("kept", "defective", "kept_defective")}
        for batch, selection in zip(batches, same.select(batches, None, step).selections):
            assert torch.equal(selection.label_mask, response_mask_of(batch))
        for batch, selection in zip(batches, pruned.select(batches, None, step).selections):
            n = response_mask_of(batch)[selection.rows].sum(1)
            assert selection.label_mask[selection.rows].sum(1).tolist() == [keep_count(0.5, int(k)) for k in n]
    unbound = build_method(f"{name}+random", config(method=f"{name}+random"))
    with pytest.raises(QTuneError, match=f"{name}\\+random reads the training records' metadata"):
        unbound.select(batches, None, 0)
    with pytest.raises(QTuneError, match=f"{name}\\+random is a ground-truth control"):
        unbound.bind_records({0: {"category": "noise"}})


# --- token_matched_random ------------------------------------------------------------------------


def test_token_matched_random_keeps_the_requested_fraction_of_tokens():
    rng = random.Random(0)
    method = build_method("token_matched_random", config(r_sample=0.25, match_fraction=0.3, seed=2))
    kept_total = response_total = 0
    for step in range(200):
        batches = step_batches([[rng.randint(5, 60) for _ in range(4)] for _ in range(2)], seed=step)
        decision = method.select(batches, None, step)
        response = decision.response_tokens
        assert decision.kept_tokens == max(1, round(0.3 * response))
        assert decision.stats["kept"] >= keep_count(0.25, 8)
        for batch, selection in zip(batches, decision.selections):
            assert not (selection.label_mask & ~response_mask_of(batch)).any()  # response tokens only
            dropped = torch.ones(batch["labels"].shape[0], dtype=torch.bool)
            dropped[selection.rows] = False
            assert not selection.label_mask[dropped].any()  # of kept samples only
        again = method.select(batches, None, step)
        assert all(torch.equal(a.label_mask, b.label_mask) for a, b in zip(again.selections, decision.selections))
        kept_total, response_total = kept_total + decision.kept_tokens, response_total + response
    assert abs(kept_total / response_total - 0.3) < 0.01
    assert method.nominal_budget == 0.3


def test_token_matched_random_adds_samples_until_they_hold_the_tokens():
    batches = step_batches([[10] * 8])  # 7 response tokens per sample, 56 in all
    decision = build_method("token_matched_random", config(r_sample=0.125, match_fraction=0.5)).select(batches, None, 0)
    assert decision.kept_tokens == 28 and decision.stats["kept"] == 4  # 4 samples hold 28 tokens: all of them
    rows = decision.selections[0].rows
    assert torch.equal(decision.selections[0].label_mask[rows], response_mask_of(batches[0])[rows])


def test_token_matched_random_reads_the_fraction_of_a_finished_run(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"loss_token_fraction": 0.42}))
    method = build_method("token_matched_random", config(match_run=str(tmp_path)))
    assert method.fraction == 0.42
    with pytest.raises(QTuneError, match="--match-run .*no loss_token_fraction"):
        build_method("token_matched_random", config(match_run=str(tmp_path / "missing")))
    with pytest.raises(QTuneError, match="needs the fraction .*--match-fraction"):
        build_method("token_matched_random", config())
    with pytest.raises(OptionError, match="match_run"):
        config(match_fraction=0.3, match_run=str(tmp_path))


# --- labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["oracle", "oracle_ratio", "anti_oracle"])
def test_unlabelled_data_is_a_clear_error(name):
    method = build_method(name, config(method=name))
    with pytest.raises(QTuneError, match=f"{name} has no labels: call bind_records"):
        method.select(step_batches([[9, 12]]), None, 0)
    with pytest.raises(QTuneError, match=f"{name} is a ground-truth control.*2 of 3 records lack.*first: sample 1"
                                         ".*labelled data"):
        method.bind_records({0: {"defective": False}, 1: {"category": "noise"}, 2: {"defective": "yes"}})
    method.bind_records({0: {"defective": False}})
    with pytest.raises(QTuneError, match="record 1 is not among the bound"):
        method.select(step_batches([[9, 12]]), None, 0)


def test_trl_front_end_binds_each_rows_metadata_by_sample_id(tiny_model_dir, tiny_tokenizer, tmp_path):
    rows = Dataset.from_list([{"sample_id": 7, "metadata": {"defective": True}}, {"sample_id": 9, "metadata": None}])
    assert _metadata_by_id(rows) == {7: {"defective": True}, 9: {}}
    assert _metadata_by_id(Dataset.from_list([{"sample_id": 3}])) == {3: {}}
    labelled = messages_dataset().map(lambda row, i: {"metadata": {"defective": i % 4 == 0}}, with_indices=True)
    train_trl(tiny_model_dir, tiny_tokenizer, labelled, tmp_path, method="oracle")
    steps = read_step_log(tmp_path / "steps.jsonl")
    assert steps and all(sorted(s["kept_ids"]) == sorted(i for i in s["sample_ids"] if i % 4) for s in steps)


# --- a training run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_inputs(tmp_path_factory, tiny_model_dir):
    """The tiny model and 24 records, every fourth one defective (a wrong answer)."""
    path = tmp_path_factory.mktemp("labelled") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            a, b = 2 + i, 5 + 2 * i
            answer = a + b + (1 if i % 4 == 0 else 0)
            f.write(json.dumps({"question": f"Tom has {a} apples and buys {b}. How many?",
                                "answer": f"{a} + {b} = <<{a}+{b}={answer}>>{answer}.\n#### {answer}",
                                "metadata": {"defective": i % 4 == 0}}) + "\n")
    return tiny_model_dir, path


def test_qtune_train_with_the_oracle_trains_only_clean_records(labelled_inputs, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(labelled_inputs[0]), "--data", str(labelled_inputs[1]), "--out", str(out),
                 "--method", "oracle", "--batch-size", "8", "--max-steps", "3", "--no-progress"]) == 0
    steps = read_step_log(out / "steps.jsonl")
    assert len(steps) == 3
    for step in steps:
        clean = [i for i in step["sample_ids"] if i % 4]
        assert sorted(step["kept_ids"]) == sorted(clean) and step["kept_defective"] == 0
    assert sum(s["kept_tokens"] for s in steps) < sum(s["response_tokens"] for s in steps)
    assert json.loads((out / "summary.json").read_text())["nominal_budget"] == 0.75


def test_qtune_train_with_the_ceiling_at_a_token_budget(labelled_inputs, tmp_path):
    """oracle_ratio+random: half of each step's samples, clean first, half of their tokens."""
    out = tmp_path / "run"
    assert main(["train", "--model", str(labelled_inputs[0]), "--data", str(labelled_inputs[1]), "--out", str(out),
                 "--method", "oracle_ratio+random", "--r-sample", "0.5", "--r-token", "0.5", "--batch-size", "8",
                 "--max-steps", "3", "--no-progress"]) == 0
    for step in read_step_log(out / "steps.jsonl"):
        assert step["kept"] == 4 and step["kept_defective"] == 0 and all(i % 4 for i in step["kept_ids"])
        assert step["kept_tokens"] < step["response_tokens"] / 2
    assert json.loads((out / "summary.json").read_text())["nominal_budget"] == 0.25


def test_training_a_ground_truth_control_on_unlabelled_data_stops_before_training(tiny_run_inputs, tmp_path):
    with pytest.raises(QTuneError, match="oracle_ratio is a ground-truth control.*labelled data"):
        run_train(train_config(tiny_run_inputs, tmp_path / "run", method="oracle_ratio"))
    assert not (tmp_path / "run" / "steps.jsonl").exists()
