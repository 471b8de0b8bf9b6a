"""Option checking: every value is converted to its field's type and checked against its range,
for flags, YAML files and Python alike, before any command loads a model or data."""

import pytest

from qtune.bench import BenchConfig
from qtune.cli import build_parser, main
from qtune.config import EvalRunConfig, TrainConfig, build_config
from qtune.errors import OptionError, QTuneError

REQUIRED = ["--model", "m", "--data", "d.jsonl"]


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect a one-line error, return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def from_yaml(tmp_path, text: str, cls=TrainConfig):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d.jsonl\nout: o\n" + text + "\n")
    return build_config(cls, None, str(path)), str(path)


# --- YAML ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ("max_steps: two", "max_steps in {path} must be an integer; got 'two'"),
    ("batch_size: 8.5", "batch_size in {path} must be an integer; got 8.5"),
    ("progress: 'no'", "progress in {path} must be true or false (unquoted in YAML); got 'no'"),
    ("r_sample: high", "r_sample in {path} must be a number; got 'high'"),
    ("lr: .nan", "lr in {path} must be a finite number; got nan"),
    ("r_token: 1.5", "r_token in {path} must be in (0, 1]; got 1.5"),
    ("method: nope", "method in {path} must be a registered method: anti_oracle, full, oracle, oracle_ratio, qtuning, random, token_matched_random"
     "; or SAMPLE+TOKEN with SAMPLE one of anti_oracle, entropy, infobatch, infobatch_exact, longest, oracle_ratio, perplexity, random, shortest, uds and TOKEN one of all, attention, perplexity, random, rho1, token_cleaning; got 'nope'"),
])
def test_yaml_values_of_the_wrong_type_or_range_are_one_line_errors(tmp_path, line, expected):
    path = tmp_path / "run.yaml"
    with pytest.raises(OptionError) as info:
        from_yaml(tmp_path, line)
    assert str(info.value) == expected.format(path=path)


def test_yaml_values_are_converted_to_the_declared_types(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; quoted numbers are numbers; unquoted yes/no are booleans.
    cfg, _ = from_yaml(tmp_path, "lr: 1e-3\nbatch_size: '8'\nepochs: 2\nprogress: no\nlimit: null\npad_token: null")
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.progress, cfg.limit) == (0.001, 8, 2.0, False, None)
    assert type(cfg.epochs) is float and type(cfg.batch_size) is int
    cfg, _ = from_yaml(tmp_path, "stop: ['Question:', '###']", EvalRunConfig)
    assert cfg.stop == ("Question:", "###")
    bench_yaml = tmp_path / "bench.yaml"
    bench_yaml.write_text("seeds: 0\nlr: 1e-3\n")  # an unquoted single seed is a number to YAML
    cfg = build_config(BenchConfig, None, str(bench_yaml))
    assert (cfg.seeds, cfg.lr) == ("0", 0.001)


# --- flags ---------------------------------------------------------------------------------------


TRAIN_FLAGS = [
    (["--lr", "0"], "--lr must be greater than 0; got 0.0"),
    (["--lr", "-1"], "--lr must be greater than 0; got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number; got 'nan'"),
    (["--lr", "inf"], "--lr must be a finite number; got 'inf'"),
    (["--lr", "fast"], "--lr must be a number; got 'fast'"),
    (["--batch-size", "8.5"], "--batch-size must be an integer; got '8.5'"),
    (["--max-steps", "two"], "--max-steps must be an integer; got 'two'"),
    (["--dtype", "int8"], "--dtype must be one of auto, float32, bfloat16, float16; got 'int8'"),
    (["--epochs", "0"], "--epochs must be greater than 0 unless max_steps is at least 1; got 0.0"),
    (["--epochs", "-1"], "--epochs must be greater than 0 unless max_steps is at least 1; got -1.0"),
    (["--max-steps", "0"], "--max-steps must be -1 (train for the given epochs) or at least 1; got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1; got 0"),
    (["--r-sample", "0"], "--r-sample must be in (0, 1]; got 0.0"),
    (["--r-sample", "1.5"], "--r-sample must be in (0, 1]; got 1.5"),
    (["--r-token", "0"], "--r-token must be in (0, 1]; got 0.0"),
    (["--r-token", "1.01"], "--r-token must be in (0, 1]; got 1.01"),
    (["--lam", "-0.1"], "--lam must be in [0, 1]; got -0.1"),
    (["--lam", "1.5"], "--lam must be in [0, 1]; got 1.5"),
    (["--triage-start", "1"], "--triage-start must be in [0, 1); got 1.0"),
    (["--method", "nope"], "--method must be a registered method: anti_oracle, full, oracle, oracle_ratio, qtuning, random, token_matched_random"
     "; or SAMPLE+TOKEN with SAMPLE one of anti_oracle, entropy, infobatch, infobatch_exact, longest, oracle_ratio, perplexity, random, shortest, uds and TOKEN one of all, attention, perplexity, random, rho1, token_cleaning; got 'nope'"),
    (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1); got 1.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be at least 0; got -0.1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be at least 0; got -1.0"),
    (["--lr-scheduler", "cosine_typo"], "--lr-scheduler must be a transformers scheduler: linear, cosine"),
    (["--lora-r", "-1"], "--lora-r must be at least 0; got -1"),
    (["--lora-alpha", "0"], "--lora-alpha must be greater than 0; got 0"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1); got 1.0"),
    (["--chunk-tokens", "0"], "--chunk-tokens must be at least 1; got 0"),
    (["--max-length", "1"], "--max-length must be at least 2; got 1"),
    (["--limit", "0"], "--limit must be at least 1; got 0"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]; got -1"),
    (["--save-steps", "0"], "--save-steps must be at least 1; got 0"),
    (["--save-total-limit", "0"], "--save-total-limit must be at least 1; got 0"),
    (["--logging-steps", "0"], "--logging-steps must be at least 1; got 0"),
    (["--device", "gpu"], "--device must be auto or a torch device such as cpu, cuda, cuda:1, mps; got 'gpu'"),
]


@pytest.mark.parametrize("flags, expected", TRAIN_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_FLAGS])
def test_train_flags_out_of_range_fail_before_anything_runs(tmp_path, capsys, flags, expected):
    out = tmp_path / "o"
    err = refused(["train", *REQUIRED, "--out", str(out), *flags], capsys)
    assert err.startswith("error: " + expected)
    assert not out.exists()  # refused before the run touched anything


@pytest.mark.parametrize("r_sample", ["0", "1.5"])
def test_random_pruning_refuses_a_keep_ratio_outside_0_1(tmp_path, capsys, r_sample):
    err = refused(["train", *REQUIRED, "--out", str(tmp_path / "o"), "--method", "random", "--r-sample", r_sample],
                  capsys)
    assert err == f"error: --r-sample must be in (0, 1]; got {float(r_sample)}"


def test_epochs_may_be_zero_when_max_steps_is_set():
    ns = build_parser().parse_args(["train", *REQUIRED, "--out", "o", "--epochs", "0", "--max-steps", "5"])
    assert build_config(TrainConfig, ns, None).max_steps == 5


OTHER_FLAGS = [
    (["score", *REQUIRED, "--out", "OUT", "--batch-size", "0"], "--batch-size must be at least 1; got 0"),
    (["score", *REQUIRED, "--out", "OUT", "--r-sample", "0"], "--r-sample must be in (0, 1]; got 0.0"),
    (["score", *REQUIRED, "--out", "OUT", "--chunk-tokens", "0"], "--chunk-tokens must be at least 1; got 0"),
    (["eval", *REQUIRED, "--out", "OUT", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1; got 0"),
    (["eval", *REQUIRED, "--out", "OUT", "--batch-size", "0"], "--batch-size must be at least 1; got 0"),
    (["eval", *REQUIRED, "--out", "OUT", "--num-fewshot", "-1"], "--num-fewshot must be at least 0; got -1"),
    (["eval", *REQUIRED, "--out", "OUT", "--num-fewshot", "2"],
     "--fewshot-data must be a file of solved examples (e.g. the train split) when num_fewshot is above 0; got None"),
    (["eval", *REQUIRED, "--out", "OUT", "--stop", ""], "--stop must be non-empty strings"),
    (["bench", "--out", "OUT", "--jobs", "0"], "--jobs must be at least 1; got 0"),
    (["bench", "--out", "OUT", "--examples", "-1"], "--examples must be at least 0; got -1"),
    (["bench", "--out", "OUT", "--lr", "-1"], "--lr must be greater than 0; got -1.0"),
    (["bench", "--out", "OUT", "--epochs", "0"], "--epochs must be greater than 0 unless max_steps is at least 1"),
    (["bench", "--out", "OUT", "--eval-batch-size", "0"], "--eval-batch-size must be at least 1; got 0"),
    (["bench", "--out", "OUT", "--eval-limit", "0"], "--eval-limit must be at least 1; got 0"),
]


@pytest.mark.parametrize("argv, expected", OTHER_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in OTHER_FLAGS])
def test_score_eval_and_bench_flags_out_of_range_fail_before_anything_runs(tmp_path, capsys, argv, expected):
    out = tmp_path / "o"
    err = refused([str(out) if a == "OUT" else a for a in argv], capsys)
    assert err.startswith("error: " + expected)
    assert not out.exists()


def test_stop_flag_takes_several_strings():
    ns = build_parser().parse_args(["eval", *REQUIRED, "--out", "o", "--stop", "Question:", "###"])
    assert build_config(EvalRunConfig, ns, None).stop == ("Question:", "###")


def test_help_states_the_ranges(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: 0.25; in (0, 1])" in " ".join(capsys.readouterr().out.split())


# --- Python --------------------------------------------------------------------------------------


def test_python_construction_converts_and_checks_like_the_cli():
    cfg = TrainConfig(model="m", data="d", out="o", lr="1e-3", batch_size="8", epochs=3)
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (0.001, 8, 3.0)
    with pytest.raises(OptionError, match=r"^batch_size must be at least 1; got 0$"):
        TrainConfig(model="m", data="d", out="o", batch_size=0)
    with pytest.raises(OptionError, match=r"^lr must be a finite number; got nan$"):
        TrainConfig(model="m", data="d", out="o", lr=float("nan"))
    with pytest.raises(OptionError, match=r"^progress must be true or false \(unquoted in YAML\); got 'no'$"):
        TrainConfig(model="m", data="d", out="o", progress="no")
    with pytest.raises(OptionError, match=r"^model must be a string; got None$"):
        TrainConfig(data="d", out="o")
    with pytest.raises(OptionError, match=r"^jobs must be at least 1; got 0$"):
        BenchConfig(jobs=0)
    assert issubclass(OptionError, QTuneError)  # the CLI prints it as one line
