"""Tests of qtune.tokenized: the same records, samples and reports as load_records + tokenize_records,
in parallel, memory-mapped, and cached by content (hits, misses, damaged entries, no cache)."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import shutil
from pathlib import Path

import pytest

import qtune.data
from qtune import tokenized
from qtune.config import DataConfig
from qtune.data import Record, load_records, tokenize_records
from qtune.errors import DataError, QTuneError
from qtune.samples import load_samples
from qtune.tokenized import load_tokenized

# Renders earlier assistant turns differently once a later one follows: multi-turn conversations
# split into one sample per turn (test_data.py's template).
SPLITTING_TEMPLATE = (
    "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}FINAL:{% endif %}"
    "{{ m['content'] }}{% endfor %}"
)


def conversation(i: int) -> dict:
    """Row i of the test file: alpaca-like messages of varied length, some multi-turn, some with
    metadata, one with a long prompt (truncated away at max_length 48), one with an empty answer."""
    if i == 5:
        return {"messages": [{"role": "user", "content": "Count: " + "1 2 3 " * 40},
                             {"role": "assistant", "content": "120"}]}
    if i == 9:
        return {"messages": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": " "}]}
    messages = [{"role": "user", "content": f"What is {i} + {i % 7}?" + " Think." * (i % 5)},
                {"role": "assistant", "content": f"{i} + {i % 7} = {i + i % 7}. #### {i + i % 7}"}]
    if i % 4 == 0:
        messages += [{"role": "user", "content": "And doubled?"},
                     {"role": "assistant", "content": f"{2 * (i + i % 7)}"}]
    row = {"messages": messages}
    if i % 3 == 0:
        row["metadata"] = {"category": "clean" if i % 2 else "noise", "n": i}
    return row


def write_data(path: Path, n: int, *, bad_line: int | None = None) -> Path:
    lines = [json.dumps(conversation(i)) for i in range(n)]
    if bad_line is not None:
        lines[bad_line - 1] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def reference(path, tokenizer, **options):
    """Today's path: load_records then tokenize_records."""
    load = {k: options.pop(k) for k in ("format", "skip_invalid", "limit") if k in options}
    records, load_report = load_records(path, **load)
    samples, tok_report = tokenize_records(records, tokenizer, **options)
    return records, samples, load_report, tok_report


def assert_same(data, expected):
    records, samples, load_report, tok_report = expected
    assert list(data.samples) == samples
    assert list(data.records) == records
    assert data.load_report == load_report
    assert data.tokenize_report == tok_report


@pytest.fixture
def splitting_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = SPLITTING_TEMPLATE
    return tokenizer


class CountingTokenizer:
    """A tokenizer that counts the calls that tokenize or render (everything else is the wrapped one's)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("tokenizer_name", ["tiny_tokenizer", "plain_tokenizer", "splitting_tokenizer"])
def test_same_records_samples_and_reports_as_tokenize_records(request, tmp_path, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    path = write_data(tmp_path / "train.jsonl", 40, bad_line=12)
    options = dict(skip_invalid=True, max_length=48, truncation_side="right")
    expected = reference(path, tokenizer, **options)
    _, samples, _, report = expected
    assert report.excluded_ids and report.n_truncated  # the file exercises exclusion and truncation
    assert (report.n_split > 0) == (tokenizer_name == "splitting_tokenizer")
    data = load_tokenized(path, tokenizer, cache_dir=tmp_path / "cache", num_proc=1, **options)
    assert not data.from_cache
    assert_same(data, expected)
    assert data.samples.lengths.tolist() == [len(s["input_ids"]) for s in samples]
    assert data.samples.sample_ids.tolist() == [s["sample_id"] for s in samples]
    assert_same(load_tokenized(path, tokenizer, cache_dir=tmp_path / "cache", **options), expected)


def test_two_processes_give_what_one_gives(tmp_path, splitting_tokenizer, monkeypatch):
    # More records than one tokenizer batch and one Arrow batch, so that every piece is several.
    monkeypatch.setattr(tokenized, "_RECORD_BATCH", 300)
    path = write_data(tmp_path / "train.jsonl", 1100)
    one = load_tokenized(path, splitting_tokenizer, max_length=48, num_proc=1, cache=False)
    two = load_tokenized(path, splitting_tokenizer, max_length=48, num_proc=2, cache_dir=tmp_path / "cache")
    assert len(json.loads((two.folder / "manifest.json").read_text())["sample_files"]) == 2
    assert_same(two, (list(one.records), list(one.samples), one.load_report, one.tokenize_report))
    assert_same(one, reference(path, splitting_tokenizer, max_length=48))


def test_second_call_reads_from_the_cache_without_tokenizing(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_data(tmp_path / "train.jsonl", 30)
    first = CountingTokenizer(tiny_tokenizer)
    built = load_tokenized(path, first, max_length=48, num_proc=1, cache_dir=tmp_path / "cache")
    assert first.calls > 0 and not built.from_cache

    def fail(*args, **kwargs):
        raise AssertionError("rendered a record on a cache hit")

    monkeypatch.setattr(qtune.data.tokenization, "render_samples", fail)
    second = CountingTokenizer(tiny_tokenizer)
    # A copy of the file elsewhere has the same content, hence the same entry.
    copied = shutil.copy(path, tmp_path / "copy.jsonl")
    hit = load_tokenized(copied, second, max_length=48, num_proc=1, cache_dir=tmp_path / "cache")
    assert second.calls == 0 and hit.from_cache and hit.folder == built.folder
    assert list(hit.samples) == list(built.samples) and list(hit.records) == list(built.records)
    assert hit.load_report.path == str(copied)


def test_a_datasets_folder_is_keyed_by_its_files(tmp_path, tiny_tokenizer):
    import datasets

    rows = [conversation(i) for i in range(12)]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"messages": row["messages"]} for row in rows]).save_to_disk(str(folder))
    options = dict(max_length=48, cache_dir=tmp_path / "cache")
    first = load_tokenized(folder, tiny_tokenizer, **options)
    assert_same(first, reference(folder, tiny_tokenizer, max_length=48))
    assert load_tokenized(folder, tiny_tokenizer, **options).from_cache
    datasets.Dataset.from_list([{"messages": row["messages"]} for row in rows[:6]]).save_to_disk(str(folder))
    changed = load_tokenized(folder, tiny_tokenizer, **options)
    assert not changed.from_cache and len(changed.records) == 6


def _change_file(path, tokenizer, options):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(conversation(99)) + "\n")
    return tokenizer, options


def _change_tokenizer(path, tokenizer, options):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(["Think."])
    return tokenizer, options


def _change_template(path, tokenizer, options):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|end|>", "</s>")
    return tokenizer, options


@pytest.mark.parametrize("change", [
    _change_file, _change_tokenizer, _change_template,
    lambda path, tokenizer, options: (tokenizer, {**options, "max_length": 40}),
    lambda path, tokenizer, options: (tokenizer, {**options, "truncation_side": "left"}),
    lambda path, tokenizer, options: (tokenizer, {**options, "limit": 10}),
], ids=["file", "tokenizer", "template", "max_length", "truncation_side", "limit"])
def test_cache_misses_when_an_input_changes(tmp_path, tiny_tokenizer, change):
    path = write_data(tmp_path / "train.jsonl", 20)
    options = {"max_length": 48, "cache_dir": tmp_path / "cache"}
    first = load_tokenized(path, tiny_tokenizer, **options)
    tokenizer, options = change(path, tiny_tokenizer, options)
    changed = load_tokenized(path, tokenizer, **options)
    assert not changed.from_cache and changed.folder != first.folder
    options.pop("cache_dir")
    assert_same(changed, reference(path, tokenizer, **options))
    assert load_tokenized(path, tokenizer, cache_dir=tmp_path / "cache", **options).from_cache


def _truncate_shard(folder):
    shard = folder / json.loads((folder / "manifest.json").read_text())["sample_files"][0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


@pytest.mark.parametrize("damage", [
    lambda folder: (folder / "manifest.json").unlink(),
    lambda folder: (folder / "manifest.json").write_text('{"files": '),
    lambda folder: (folder / "records.arrow").unlink(),
    lambda folder: (folder / "records.arrow").write_bytes(b"\0" * (folder / "records.arrow").stat().st_size),
    _truncate_shard,
], ids=["no manifest", "cut manifest", "no records", "zeroed records", "cut shard"])
def test_a_damaged_entry_is_rebuilt(tmp_path, tiny_tokenizer, damage, capsys):
    path = write_data(tmp_path / "train.jsonl", 20)
    built = load_tokenized(path, tiny_tokenizer, max_length=48, cache_dir=tmp_path / "cache")
    damage(built.folder)
    rebuilt = load_tokenized(path, tiny_tokenizer, max_length=48, cache_dir=tmp_path / "cache")
    assert not rebuilt.from_cache and rebuilt.folder == built.folder
    assert "is damaged" in capsys.readouterr().err
    assert_same(rebuilt, reference(path, tiny_tokenizer, max_length=48))
    assert load_tokenized(path, tiny_tokenizer, max_length=48, cache_dir=tmp_path / "cache").from_cache
    key = built.folder.name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{key}.lock", key]  # no leftovers


def test_processes_asking_at_once_build_one_entry(tmp_path, tiny_tokenizer):
    path = write_data(tmp_path / "train.jsonl", 200)
    tokenizers = [CountingTokenizer(tiny_tokenizer) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # each thread opens the lock file itself
        results = list(pool.map(lambda tok: load_tokenized(path, tok, max_length=48, num_proc=1,
                                                           cache_dir=tmp_path / "cache"), tokenizers))
    assert sorted(data.from_cache for data in results) == [False, True, True]
    assert sum(tok.calls > 0 for tok in tokenizers) == 1
    expected = reference(path, tiny_tokenizer, max_length=48)
    for data in results:
        assert_same(data, expected)


def test_a_build_killed_midway_is_ignored(tmp_path, tiny_tokenizer):
    path = write_data(tmp_path / "train.jsonl", 20)
    built = load_tokenized(path, tiny_tokenizer, max_length=48, cache_dir=tmp_path / "cache")
    # What a kill leaves: the temporary folder, with some of the files, and no entry.
    shutil.copytree(built.folder, tmp_path / "cache" / f".{built.folder.name}.building-x")
    (tmp_path / "cache" / f".{built.folder.name}.building-x" / "manifest.json").unlink()
    shutil.rmtree(built.folder)
    again = load_tokenized(path, tiny_tokenizer, max_length=48, cache_dir=tmp_path / "cache")
    assert not again.from_cache and again.folder == built.folder
    assert_same(again, reference(path, tiny_tokenizer, max_length=48))


def test_without_the_cache_nothing_stays_on_disk(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("QTUNE_DATA_CACHE", str(tmp_path / "cache"))
    path = write_data(tmp_path / "train.jsonl", 20)
    data = load_tokenized(path, tiny_tokenizer, max_length=48, cache=False)
    assert data.folder is None and not data.from_cache
    assert not (tmp_path / "cache").exists() and not any((tmp_path / "tmp").iterdir())
    assert_same(data, reference(path, tiny_tokenizer, max_length=48))  # still readable: the files are mapped


def test_errors_are_those_of_load_records_and_tokenize_records(tmp_path, tiny_tokenizer):
    path = write_data(tmp_path / "train.jsonl", 20, bad_line=7)
    with pytest.raises(DataError) as expected:
        load_records(path)
    with pytest.raises(DataError) as got:
        load_tokenized(path, tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert str(got.value) == str(expected.value) == f"{path}, line 7: conversation has no assistant turn"
    with pytest.raises(QTuneError, match="no such file or directory"):
        load_tokenized(tmp_path / "missing.jsonl", tiny_tokenizer, cache_dir=tmp_path / "cache")
    with pytest.raises(QTuneError, match="max_length must be at least 1"):
        load_tokenized(path, tiny_tokenizer, max_length=0, cache_dir=tmp_path / "cache")
    with pytest.raises(QTuneError, match="num_proc must be at least 1"):
        load_tokenized(path, tiny_tokenizer, num_proc=0, cache_dir=tmp_path / "cache")
    (tmp_path / "bad.jsonl").write_text(json.dumps(conversation(0)) + "\n"
                                        '{"messages": [{"role": "assistant", "content": "hi"}]}\n')
    with pytest.raises(QTuneError, match="sample 1: "):  # raised in the second tokenizing process
        load_tokenized(tmp_path / "bad.jsonl", tiny_tokenizer, num_proc=2, cache=False)
    assert not any(".building-" in p.name for p in (tmp_path / "cache").iterdir())  # failed builds leave nothing


def test_tables_behave_like_lists(tmp_path, tiny_tokenizer):
    path = write_data(tmp_path / "train.jsonl", 30)
    records, samples, _, _ = reference(path, tiny_tokenizer, max_length=48)
    data = load_tokenized(path, tiny_tokenizer, max_length=48, cache=False)
    assert len(data.samples) == len(samples) and len(data.records) == len(records)
    assert data.samples[-1] == samples[-1] and data.samples[3:7] == samples[3:7] and data.samples[::5] == samples[::5]
    assert data.records[-2] == records[-2] and data.records[1:3] == records[1:3]
    assert isinstance(data.records[0], Record) and data.records[3].metadata == {"category": "clean", "n": 3}
    for table, n in ((data.samples, len(samples)), (data.records, len(records))):
        with pytest.raises(IndexError):
            table[n]
        with pytest.raises(IndexError):
            table[-n - 1]


def test_load_samples_takes_the_data_options(tmp_path, tiny_tokenizer, capsys):
    path = write_data(tmp_path / "train.jsonl", 20)
    records, samples, _, _ = reference(path, tiny_tokenizer, max_length=48, limit=15)
    cfg = DataConfig(data=str(path), max_length=48, limit=15)
    assert (cfg.num_proc, cfg.data_cache) == (None, True)
    for _ in range(2):
        got_records, got_samples = load_samples(cfg, tiny_tokenizer)
        assert list(got_records) == records and list(got_samples) == samples
    assert "tokenized samples from the cache" in capsys.readouterr().err
    cfg = DataConfig(data=str(path), max_length=48, limit=15, data_cache=False, num_proc=1)
    assert list(load_samples(cfg, tiny_tokenizer)[1]) == samples
    assert "from the cache" not in capsys.readouterr().err


def test_default_num_proc(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert tokenized.default_num_proc(tokenized.PARALLEL_MIN_RECORDS - 1) == 1
    assert tokenized.default_num_proc(tokenized.PARALLEL_MIN_RECORDS) == tokenized.MAX_DEFAULT_PROCS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert tokenized.default_num_proc(10**6) == 2
