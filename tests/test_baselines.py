"""The per-batch baselines (`qtune.methods.rules` and the rule files): each sample rule and token
rule on hand-made steps (exact kept rows and tokens, tie rules), composition by name, InfoBatch's
weights and annealing, unknown names, and short training runs."""

import dataclasses
import itertools
import math
import re

import pytest
import torch
from test_train import make_batch, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)

from qtune.cli import main
from qtune.config import TrainConfig
from qtune.errors import OptionError, QTuneError
from qtune.methods import (
    METHODS,
    SAMPLE_RULES,
    TOKEN_RULES,
    ComposedMethod,
    build_method,
    register_sample_rule,
    register_token_rule,
    response_mask_of,
)
from qtune.methods.infobatch import anneal_start
from qtune.methods.rules import SampleRule, TokenRule
from qtune.scoring import BatchScores
from qtune.train import read_step_log, run_train


def config(**values) -> TrainConfig:
    return TrainConfig(model="m", data="d", out="o", **values)


def method(name, **options):
    return build_method(name, config(method=name, **options))


def step_batches(lengths_per_batch):
    """Micro-batches with rows of the given lengths (prompt 3 tokens: a row of n tokens has n - 3
    response tokens)."""
    return [make_batch(lengths, seed=j) for j, lengths in enumerate(lengths_per_batch)]


def scores_for(batch, nll_rows, ent=None) -> BatchScores:
    """BatchScores whose response tokens have the NLLs of `nll_rows` (one list per row, in response
    order); ppl = exp(mean NLL), ent = `ent` (per sample) or 0."""
    response = response_mask_of(batch)
    nll = torch.zeros(response.shape)
    for row, values in enumerate(nll_rows):
        nll[row, response[row]] = torch.tensor(values, dtype=torch.float32)
    n = response.sum(1)
    ppl = torch.exp(nll.sum(1) / n)
    ent = torch.zeros(len(nll_rows)) if ent is None else torch.tensor(ent, dtype=torch.float32)
    return BatchScores(nll, torch.zeros_like(nll), response, ppl, ent, n)


def flat_scores(batches, values, key):
    """Scores whose per-sample `key` ("ppl" or "ent") are `values` over the step (micro-batches in order)."""
    out, start = [], 0
    for b in batches:
        rows = b["labels"].shape[0]
        s = scores_for(b, [[1.0] * int(n) for n in response_mask_of(b).sum(1)])
        setattr(s, key, torch.tensor(values[start:start + rows], dtype=torch.float32))
        out.append(s)
        start += rows
    return out


def loss_scores(batches, losses):
    """Scores whose every response token of sample i has NLL losses[i] (its mean loss)."""
    out, start = [], 0
    for b in batches:
        lengths = response_mask_of(b).sum(1).tolist()
        out.append(scores_for(b, [[losses[start + i]] * n for i, n in enumerate(lengths)]))
        start += len(lengths)
    return out


def rows(decision):
    return [s.rows.tolist() for s in decision.selections]


def kept_positions(decision, batch_index=0, row=0):
    return decision.selections[batch_index].label_mask[row].nonzero().flatten().tolist()


# --- sample rules --------------------------------------------------------------------------------


def test_longest_and_shortest_keep_by_response_length_earlier_sample_first_on_ties():
    batches = step_batches([[9, 12, 7, 11], [8, 12, 6]])  # response lengths 6 9 4 8 | 5 9 3
    longest = method("longest+all", r_sample=0.5)  # keep_count(0.5, 7) = 3
    assert longest.needs == frozenset() and not longest.needs_scores_at(0, 10)
    decision = longest.select(batches, None, 0)
    assert rows(decision) == [[1, 3], [1]]
    assert rows(method("longest+all", r_sample=0.2).select(batches, None, 0)) == [[1], []]  # 9 = 9: the earlier
    assert rows(method("shortest+all", r_sample=0.5).select(batches, None, 0)) == [[2], [0, 2]]
    ties = step_batches([[8, 8, 8], [8]])
    assert rows(method("shortest+all", r_sample=0.5).select(ties, None, 0)) == [[0, 1], []]
    assert decision.stats == {"samples": 7, "kept": 3}


def test_entropy_keeps_the_highest_mean_entropy_earlier_sample_first_on_ties():
    batches = step_batches([[8, 8, 8], [8, 8, 8]])
    ent = [0.5, 2.0, 1.0, 2.0, 0.1, 1.5]
    rule = method("entropy+all", r_sample=0.5)
    assert rule.needs == {"entropy"} and rule.needs_scores_at(0, 10)
    assert rows(rule.select(batches, flat_scores(batches, ent, "ent"), 0)) == [[1], [0, 2]]
    # keep_count(0.34, 6) = 2: the two 2.0, then with one place the earlier of them
    assert rows(method("entropy+all", r_sample=0.34).select(batches, flat_scores(batches, ent, "ent"), 0)) == [[1], [0]]
    assert rows(method("entropy+all", r_sample=0.2).select(batches, flat_scores(batches, ent, "ent"), 0)) == [[1], []]
    with pytest.raises(QTuneError, match="needs the scoring pass"):
        rule.select(batches, None, 0)


def test_perplexity_keeps_high_low_or_middle_ppl():
    batches = step_batches([[8] * 4, [8] * 4])
    ppl = [3, 1, 4, 1, 5, 9, 2, 6]  # ascending order: 1(1) 1(3) 2(6) 3(0) 4(2) 5(4) 6(7) 9(5)

    def kept(r_sample, keep):
        decision = method("perplexity+all", r_sample=r_sample, ppl_keep=keep).select(
            batches, flat_scores(batches, ppl, "ppl"), 0)
        return sorted(r + 4 * j for j, rs in enumerate(rows(decision)) for r in rs)

    assert method("perplexity+all").needs == {"nll"} and method("perplexity+all").config.ppl_keep == "middle"
    assert kept(0.25, "high") == [5, 7]
    assert kept(0.25, "low") == [1, 3]
    assert kept(0.125, "low") == [1]  # 1 = 1: the earlier
    assert kept(0.25, "middle") == [0, 2]  # positions 3, 4 of the order
    assert kept(0.375, "middle") == [0, 2, 6]  # positions 2, 3, 4
    assert kept(1.0, "middle") == list(range(8))


def test_random_samples_and_tokens_decide_exactly_as_the_random_method():
    batches = step_batches([[12] * 8, [10] * 8])
    options = dict(r_sample=0.25, r_token=0.5, seed=3)
    composed, plain = method("random+random", **options), method("random", **options)
    assert composed.needs == frozenset() and composed.nominal_budget == plain.nominal_budget == 0.125
    for step in range(3):
        a, b = composed.select(batches, None, step), plain.select(batches, None, step)
        assert rows(a) == rows(b) and sum(map(len, rows(a))) == 4
        for x, y in zip(a.selections, b.selections):
            assert torch.equal(x.label_mask[x.rows], y.label_mask[y.rows]) and x.weights is None
    assert rows(composed.select(batches, None, 0)) != rows(composed.select(batches, None, 1))


# --- token rules ---------------------------------------------------------------------------------


def test_token_rules_all_random_and_perplexity_in_both_directions():
    batch = make_batch([8, 9])  # response positions 3..7 and 3..8
    scores = [scores_for(batch, [[0.5, 2.0, 1.0, 2.0, 0.1], [1.0] * 6])]
    step = [batch]

    def keep(name, **options):
        return method(name, r_sample=1.0, **options).select(step, scores, 0)

    assert torch.equal(keep("longest+all").selections[0].label_mask, response_mask_of(batch))
    decision = keep("longest+perplexity", r_token=0.6)  # keep_count(0.6, 5) = 3, keep_count(0.6, 6) = 3
    assert kept_positions(decision) == [3, 5, 7] and kept_positions(decision, row=1) == [3, 4, 5]  # ties: earlier
    reversed_ = keep("longest+perplexity", r_token=0.6, ppl_reversed=True)
    assert kept_positions(reversed_) == [4, 5, 6] and kept_positions(reversed_, row=1) == [3, 4, 5]
    assert kept_positions(keep("longest+perplexity", r_token=0.2, ppl_reversed=True)) == [4]  # 2.0 = 2.0: earlier
    random_ = keep("longest+random", r_token=0.5, seed=1)
    counts = random_.selections[0].label_mask.sum(1).tolist()
    assert counts == [2, 3] and not (random_.selections[0].label_mask & ~response_mask_of(batch)).any()
    assert method("longest+perplexity").needs == {"nll"}


# --- composition ---------------------------------------------------------------------------------


def test_every_combination_builds_with_its_rules_options_only():
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for sample, token in itertools.product(SAMPLE_RULES, TOKEN_RULES):
        name = f"{sample}+{token}"
        built = method(name, r_sample=0.5, r_token=0.5)
        assert isinstance(built, ComposedMethod) and built.name == name and name not in METHODS
        assert built.needs == SAMPLE_RULES[sample].needs | TOKEN_RULES[token].needs
        assert type(built) is type(method(name))  # one class per name
        for f in dataclasses.fields(built.config):
            assert f.name in train_fields and train_fields[f.name].default == f.default, (name, f.name)
        expected = (1.0 if sample == "infobatch" else 0.5) * (1.0 if token == "all" else 0.5)
        assert built.nominal_budget == expected, name
    fields = {f.name for f in dataclasses.fields(method("longest+all").config)}
    assert fields == {"r_sample", "r_token", "seed"}
    fields = {f.name for f in dataclasses.fields(method("perplexity+perplexity").config)}
    assert fields == {"r_sample", "r_token", "seed", "ppl_keep", "ppl_reversed"}
    assert {"infobatch_prune", "infobatch_anneal"} <= {f.name for f in dataclasses.fields(method("infobatch+all").config)}


def test_unknown_names_and_bad_rules_are_refused():
    for name in ("nope+all", "longest+nope", "longest", "longest+all+random", "+all", "longest+"):
        unknown = re.escape(f"unknown method {name!r}; available: ") + ".*SAMPLE\\+TOKEN"
        with pytest.raises(QTuneError, match=unknown):
            build_method(name, config())
        with pytest.raises(OptionError, match="SAMPLE\\+TOKEN with SAMPLE one of anti_oracle, entropy, infobatch"):
            config(method=name)
    assert config(method="entropy+random").method == "entropy+random"
    with pytest.raises(ValueError, match="already registered"):
        register_sample_rule("longest")(type("Again", (SampleRule,), {}))
    with pytest.raises(ValueError, match="already registered or holds a"):
        register_token_rule("a+b")(type("Plus", (TokenRule,), {}))
    with pytest.raises(ValueError, match="unknown scores"):
        register_token_rule("gradient")(type("Gradient", (TokenRule,), {"needs": frozenset({"gradients"})}))
    assert "gradient" not in TOKEN_RULES and "a+b" not in TOKEN_RULES
    with pytest.raises(OptionError, match="ppl_keep"):
        config(ppl_keep="top")
    with pytest.raises(OptionError, match="infobatch_prune"):
        config(infobatch_prune=1.0)


def test_qtune_methods_lists_the_rules_and_how_to_combine_them(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "SAMPLE+TOKEN" in out and "longest+perplexity" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "rules:" not in line]
    assert listed == sorted(SAMPLE_RULES) + sorted(TOKEN_RULES)


# --- InfoBatch -----------------------------------------------------------------------------------


def test_infobatch_drops_below_mean_samples_at_random_and_reweights_the_kept_ones():
    batches = step_batches([[8, 8, 8], [8, 8, 8]])
    losses = [1.0, 2.0, 3.0, 6.0, 0.5, 4.0]  # mean 2.75: samples 0, 1, 4 are well learned
    rule = method("infobatch+all", infobatch_prune=0.5, seed=2)
    assert rule.needs == {"nll"} and rule.nominal_budget == 1.0
    assert rule.needs_scores_at(0, 100)
    for step in range(4):
        decision = rule.select(batches, loss_scores(batches, losses), step)
        draw = torch.rand(6, generator=torch.Generator().manual_seed(2 * 1_000_003 + step))  # the step's draw
        dropped = {i for i in (0, 1, 4) if draw[i] < 0.5}
        kept = [r + 3 * j for j, rs in enumerate(rows(decision)) for r in rs]
        assert kept == sorted(set(range(6)) - dropped)
        weights = torch.cat([s.weights for s in decision.selections]).tolist()
        assert weights == [2.0, 2.0, 1.0, 1.0, 2.0, 1.0]  # 1 / (1 - 0.5) for the well learned
        assert decision.stats == {"samples": 6, "kept": 6 - len(dropped), "well_learned": 3, "dropped": len(dropped)}
    never = method("infobatch+all", infobatch_prune=0.0).select(batches, loss_scores(batches, losses), 0)
    assert rows(never) == [[0, 1, 2], [0, 1, 2]] and torch.cat([s.weights for s in never.selections]).eq(1).all()
    at_mean = method("infobatch+all").select(batches, loss_scores(batches, [1.0] * 6), 0)  # none below the mean
    assert rows(at_mean) == [[0, 1, 2], [0, 1, 2]] and at_mean.stats["well_learned"] == 0


def test_infobatch_trains_on_every_sample_in_the_final_anneal_fraction():
    assert [anneal_start(a, 8) for a in (0.0, 0.125, 0.25, 1.0)] == [8, 7, 6, 0]
    assert anneal_start(0.125, 10) == 8  # floor(8.75)
    batches = step_batches([[8, 8], [8, 8]])
    scores = loss_scores(batches, [0.1, 0.2, 5.0, 5.0])
    rule = method("infobatch+all", infobatch_prune=0.9, infobatch_anneal=0.25)
    assert [rule.needs_scores_at(step, 8) for step in (0, 5, 6, 7)] == [True, True, False, False]
    annealed = rule.select(batches, None, 6)  # the step asked for no scores
    assert rows(annealed) == [[0, 1], [0, 1]] and annealed.stats == {"samples": 4, "kept": 4, "annealing": True}
    assert all(s.weights is None for s in annealed.selections)
    with_tokens = method("infobatch+perplexity", infobatch_anneal=0.25, r_token=0.5)
    assert with_tokens.needs_scores_at(7, 8)  # the token rule still needs the NLL
    decision = with_tokens.select(batches, scores, 7)
    assert rows(decision) == [[0, 1], [0, 1]] and decision.stats["annealing"]
    assert [int(s.label_mask.sum()) for s in decision.selections] == [4, 4]  # keep_count(0.5, 5) = 2 per row
    fresh = method("infobatch+all", infobatch_anneal=1.0)
    assert fresh.select(batches, scores, 0).stats["well_learned"] == 2  # run length unknown: no annealing


def test_infobatch_exact_keeps_exactly_k_high_loss_first_and_reweights_the_rest():
    batches = step_batches([[8, 8, 8], [8, 8, 8]])
    scores = loss_scores(batches, [1.0, 2.0, 3.0, 6.0, 0.5, 4.0])  # high loss: 2, 3, 5; well learned: 0, 1, 4
    exact = method("infobatch_exact+all", r_sample=0.5)
    assert exact.nominal_budget == 0.5 and exact.needs_scores_at(99, 100)
    decision = exact.select(batches, scores, 0)
    assert rows(decision) == [[2], [0, 2]] and decision.stats["kept_well_learned"] == 0
    for step in range(5):
        decision = method("infobatch_exact+all", r_sample=0.75).select(batches, scores, step)  # k = 4
        kept = [r + 3 * j for j, rs in enumerate(rows(decision)) for r in rs]
        assert len(kept) == 4 and {2, 3, 5} < set(kept)
        weights = torch.cat([s.weights for s in decision.selections]).tolist()
        assert weights == [3.0, 3.0, 1.0, 1.0, 3.0, 1.0]  # 3 well learned, 1 kept: weight 3 / 1
        few = method("infobatch_exact+all", r_sample=0.34).select(batches, scores, step)  # k = 2 of the 3 high
        few_kept = {r + 3 * j for j, rs in enumerate(rows(few)) for r in rs}
        assert len(few_kept) == 2 and few_kept < {2, 3, 5}


# --- training runs -------------------------------------------------------------------------------


def test_qtune_train_with_a_composed_method(tiny_run_inputs, tmp_path):
    model, data = tiny_run_inputs
    out = tmp_path / "longest"
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--method",
                 "longest+perplexity", "--batch-size", "8", "--max-steps", "2", "--r-sample", "0.25",
                 "--r-token", "0.5", "--no-progress", "--save-steps", "100", "--logging-steps", "1"]) == 0
    rows_ = read_step_log(out / "steps.jsonl")
    assert [r["step"] for r in rows_] == [1, 2]
    for r in rows_:
        assert r["samples"] == 8 and r["kept"] == 2 and r["scoring_seconds"] > 0
        assert 0 < r["kept_tokens"] <= math.ceil(r["response_tokens"] * 0.5)


def test_infobatch_run_weights_then_anneals(tiny_run_inputs, tmp_path):
    run = train_config(tiny_run_inputs, tmp_path / "infobatch", method="infobatch+all", max_steps=4,
                       infobatch_anneal=0.5)
    summary = run_train(run)
    rows_ = read_step_log(tmp_path / "infobatch" / "steps.jsonl")
    assert [r.get("annealing", False) for r in rows_] == [False, False, True, True]
    assert all("well_learned" in r and r["kept"] == 8 - r["dropped"] for r in rows_[:2])
    assert all(r["kept"] == 8 for r in rows_[2:]) and summary["nominal_budget"] == 1.0
