"""The `token_cleaning` token rule: one global influence threshold over the training set, fixed
before the first step by a pass with the initial weights and a reference model, saved in the run's
folder and read back on --resume."""

import pytest
import torch
from test_baselines import method
from test_train import make_batch, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtune.config import TrainConfig
from qtune.errors import QTuneError
from qtune.methods.token_cleaning import global_top_tokens
from qtune.samples import load_samples
from qtune.scoring import score_dataset
from qtune.step import plan_step
from qtune.train import TOKEN_MASKS, read_step_log, read_token_masks, run_train

#: Influence (base NLL - reference NLL) of the response tokens of three samples, by sample_id. In
#: descending order: 3.0, 2.0, then four tokens of 0.5 (in (sample_id, position) order: sample 0
#: position 0, sample 1 positions 0 and 1, sample 2 position 2), 0.0, -1.0, -2.0.
INFLUENCE = {2: torch.tensor([3.0, 0.0, 0.5, -2.0]), 0: torch.tensor([0.5, 2.0, -1.0]), 1: torch.tensor([0.5, 0.5])}


def fixed(name="longest+token_cleaning", **options):
    m = method(name, r_sample=1.0, **options)
    m.use_masks(m.fix_masks(INFLUENCE))
    return m


def test_the_global_threshold_keeps_an_exact_count_and_ties_go_to_the_earlier_token():
    """T = 9 tokens. r_token 0.5: keep floor(4.5) = 4, i.e. 3.0, 2.0 and two of the four 0.5s, the
    earliest: sample 0 position 0 and sample 1 position 0. r_token 0.2: floor(1.8) = 1, the 3.0
    alone; samples 0 and 1 keep none. A share is over the whole set, not per sample."""
    masks = method("random+token_cleaning", r_token=0.5).fix_masks(INFLUENCE)
    assert masks.sample_id.tolist() == [0, 1, 2] and masks.offsets.tolist() == [0, 3, 5, 9]
    assert masks.keep.tolist() == [True, True, False, True, False, True, False, False, False]
    assert masks.info["threshold"] == "0.5" and masks.info["kept_tokens"] == "4"
    assert masks.info["response_tokens"] == "9" and masks.info["samples_without_kept_tokens"] == "0"
    few = method("random+token_cleaning", r_token=0.2).fix_masks(INFLUENCE)
    assert few.keep.nonzero().flatten().tolist() == [5] and few.info["samples_without_kept_tokens"] == "2"
    keep, threshold = global_top_tokens(torch.tensor([1.0, 1.0, 1.0]), 0.7)  # floor(2.1) = 2 of three ties
    assert keep.tolist() == [True, True, False] and threshold == 1.0
    with pytest.raises(QTuneError, match="1 response tokens of the training set have a non-finite loss"):
        method("random+token_cleaning").fix_masks({0: torch.tensor([1.0, float("nan")])})


def test_the_steps_apply_the_fixed_masks_with_no_scoring_pass_and_count_what_they_keep():
    """Rows of 6, 5 and 7 tokens, 3 of them prompt: response positions 3..5, 3..4 and 3..6, sample ids
    0, 1, 2. With every sample kept, the masks of the first test land on those positions."""
    batch = make_batch([6, 5, 7])
    m = method("longest+token_cleaning", r_sample=1.0, r_token=0.5)
    assert m.needs == frozenset() and not m.needs_scores_at(0, 10) and m.pass_needs == {"nll", "reference_nll"}
    with pytest.raises(QTuneError, match="decides once, over the whole training set, before the first step"):
        m.select([batch], None, 0)
    m.use_masks(m.fix_masks(INFLUENCE))
    decision = m.select([batch], None, 0)
    mask = decision.selections[0].label_mask
    assert [row.nonzero().flatten().tolist() for row in mask] == [[3, 4], [3], [3]]
    assert (decision.kept_tokens, decision.response_tokens, decision.nominal_budget) == (4, 9, 0.5)

    # At r_token 0.2 only sample 2 keeps a token: the step trains that row alone and logs so.
    plan = plan_step([batch], None, fixed(r_token=0.2), 0, pad_token_id=0)
    assert (plan.record["kept"], plan.record["kept_tokens"], plan.record["kept_ids"]) == (1, 1, [2])
    assert plan.micro_batches[0]["labels"].ne(-100).sum() == 1


def test_a_sample_the_pass_did_not_see_is_refused():
    unseen = make_batch([6, 5, 7], seed=1)  # sample ids 100, 101, 102
    with pytest.raises(QTuneError, match="sample 100 .* is not among the token masks fixed before training"):
        fixed().select([unseen], None, 0)
    longer = make_batch([7, 5, 7])  # sample 0 has 4 response tokens now, not 3
    with pytest.raises(QTuneError, match=r"sample 0 \(4 response tokens\)"):
        fixed().select([longer], None, 0)


def test_training_fixes_the_masks_once_saves_them_and_a_resume_reads_them_back(tiny_run_inputs, tmp_path, capsys):
    """Reference: the tiny model with other random weights. The saved masks keep exactly half of
    the training set's response tokens, those of highest influence as computed here from the two
    models' own token NLLs; each step trains exactly the stored masks of the samples it keeps, with
    no scoring pass; --resume reads the file back, and refuses to run without it."""
    model_dir, data = tiny_run_inputs
    reference_dir = tmp_path / "reference"
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    type(model)(model.config).save_pretrained(reference_dir)  # same shape, fresh random weights
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(reference_dir)
    out = tmp_path / "run"
    options = dict(method="random+token_cleaning", r_sample=0.5, r_token=0.5, reference_model=str(reference_dir),
                   save_steps=1, max_steps=2)
    summary = run_train(train_config(tiny_run_inputs, out, **options))
    assert summary["training_set_pass_seconds"] > 0
    assert "pass over the training set:" not in capsys.readouterr().err  # progress=False: no bar

    masks = read_token_masks(out / TOKEN_MASKS)
    ids, offsets, keep = masks.sample_id, masks.offsets, masks.keep
    assert masks.info["kept_tokens"] == str(int(keep.sum())) and float(masks.info["seconds"]) > 0
    influence = influences(model_dir, reference_dir, data)
    assert ids.tolist() == sorted(influence)
    flat = torch.cat([influence[i] for i in ids.tolist()])
    assert keep.numel() == flat.numel() and int(keep.sum()) == flat.numel() // 2
    assert flat[keep].min() >= flat[~keep].max() - 1e-5  # the highest half (up to float noise of batching)
    by_id = {i: keep[offsets[j]:offsets[j + 1]] for j, i in enumerate(ids.tolist())}
    rows = read_step_log(out / "steps.jsonl")
    assert all(r["kept_tokens"] == sum(int(by_id[i].sum()) for i in r["kept_ids"]) for r in rows)
    assert all("score" not in r["phase_seconds"] for r in rows)

    before = (out / TOKEN_MASKS).read_bytes()
    run_train(train_config(tiny_run_inputs, out, **{**options, "max_steps": 3}, resume=True,
                           allow_config_change="max_steps"))
    assert (out / TOKEN_MASKS).read_bytes() == before and len(read_step_log(out / "steps.jsonl")) == 3
    (out / TOKEN_MASKS).unlink()
    with pytest.raises(QTuneError, match="qtune-token-masks.safetensors is missing"):
        run_train(train_config(tiny_run_inputs, out, **{**options, "max_steps": 4}, resume=True,
                               allow_config_change="max_steps"))


def influences(model_dir, reference_dir, data) -> dict[int, torch.Tensor]:
    """Per sample_id, model NLL - reference NLL of each response token, scored independently of
    the trainer (`score_dataset`, its own batching)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, samples = load_samples(TrainConfig(model=str(model_dir), data=str(data), out="o"), tokenizer)
    nll = []
    for folder in (model_dir, reference_dir):
        scores = score_dataset(AutoModelForCausalLM.from_pretrained(folder).eval(), samples,
                               pad_token_id=tokenizer.pad_token_id, per_token=True, progress=False)
        nll.append(dict(zip(scores.sample_id, scores.token_nll)))
    return {i: torch.tensor(nll[0][i]) - torch.tensor(nll[1][i]) for i in nll[0]}


def test_the_trl_trainer_runs_the_pass_too(tiny_model_dir, tiny_tokenizer, tmp_path):
    """QTuneSFTTrainer on a datasets.Dataset: the pass sees TRL's prepared rows. With the model as
    its own reference every influence is 0, so the tie rule keeps the first half of the response
    tokens in (sample_id, position) order."""
    from test_trl import prompt_completion_dataset, train

    trainer, changed = train(tiny_model_dir, tiny_tokenizer, prompt_completion_dataset(), tmp_path,
                             method="random+token_cleaning", reference_model=str(tiny_model_dir))
    assert changed
    masks = read_token_masks(tmp_path / TOKEN_MASKS)
    half = masks.keep.numel() // 2
    assert masks.keep[:half].all() and not masks.keep[half:].any()
    assert masks.sample_id.tolist() == list(range(len(trainer.train_dataset)))
    by_id = {i: masks.keep[masks.offsets[j]:masks.offsets[j + 1]] for j, i in enumerate(masks.sample_id.tolist())}
    rows = read_step_log(tmp_path / "steps.jsonl")
    assert rows and all(r["kept_tokens"] == sum(int(by_id[i].sum()) for i in r["kept_ids"]) for r in rows)
