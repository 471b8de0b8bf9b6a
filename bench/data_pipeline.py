"""Benchmark: loading and tokenizing 100 k and 1 M records, today's list of dicts against the Arrow path.

For each N, N alpaca records are made from the GSM8K training problems (/work/shared/data/gsm8k,
read in place; problem i % 7473 with " (#i)" appended to its instruction, so that records differ)
and written to a temporary JSONL file. Each measurement runs in a fresh process, which loads the
tokenizer (the testbed's shipped one, src/qtune/testbed/weights/saturated, by default) and imports
everything first; its RSS then is the "bare" process:

    old          load_records + tokenize_records: a list of dicts in RAM (what every command did)
    new-1proc    load_tokenized(num_proc=1), empty cache: Arrow files, memory-mapped
    new-first    load_tokenized() with the default num_proc, empty cache
    new-cached   load_tokenized() again: the cache entry new-first wrote

Reported: seconds, peak RSS of the process (ru_maxrss) and of its largest child (the tokenizing
processes), the RSS the process had before loading (bare), and for new-cached the time of one pass
that builds every sample dict and the RSS after it (the pages of the mapped files it touched count
in RSS; the kernel can drop them). The old path and new-1proc run for N <= --old-max only; above,
the old path is extrapolated linearly from the largest N measured and marked estimated. A sha256
of every sample's id, input_ids and labels checks that old and new give the same samples.

    python bench/data_pipeline.py                                  # N = 100000 and 1000000
    python bench/data_pipeline.py --n 20000 --old-max 20000        # a quick run
    python bench/data_pipeline.py --json docs/results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
TOKENIZER = ROOT / "src/qtune/testbed/weights/saturated"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes(who=resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # KiB on Linux


def _digest(samples) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(array("q", [sample["sample_id"], len(sample["input_ids"])]).tobytes())
        digest.update(array("q", sample["input_ids"]).tobytes() + array("q", sample["labels"]).tobytes())
    return digest.hexdigest()


def run_variant(args) -> dict:
    """One measurement, in this (fresh) process."""
    import datasets  # noqa: F401  (imported by every variant, so that the bare processes match)
    from qtune.data import load_records, tokenize_records
    from qtune.models import load_tokenizer
    from qtune.tokenized import load_tokenized

    tokenizer = load_tokenizer(args.tokenizer)
    bare = _rss_bytes()
    result = {"variant": args.variant, "bare_rss": bare}
    start = time.perf_counter()
    if args.variant == "old":
        records, _ = load_records(args.data)
        samples, _ = tokenize_records(records, tokenizer, max_length=args.max_length)
        procs = 1
    else:
        num_proc = 1 if args.variant == "new-1proc" else None
        data = load_tokenized(args.data, tokenizer, max_length=args.max_length, num_proc=num_proc,
                              cache_dir=args.cache_dir)
        assert data.from_cache == (args.variant == "new-cached")
        samples = data.samples
        manifest = json.loads((data.folder / "manifest.json").read_text())
        procs = len(manifest["sample_files"])
        result["cache_entry_bytes"] = sum(manifest["files"].values())
    result.update(seconds=time.perf_counter() - start, procs=procs, n_samples=len(samples),
                  peak_rss=_peak_bytes(), peak_rss_children=_peak_bytes(resource.RUSAGE_CHILDREN))
    if args.variant == "new-cached":
        start = time.perf_counter()
        tokens = sum(len(sample["input_ids"]) for sample in samples)
        result.update(pass_seconds=time.perf_counter() - start, n_tokens=tokens, rss_after_pass=_rss_bytes())
    if args.variant in ("old", "new-cached"):
        result["sha256"] = _digest(samples)
    return result


def make_records(n: int, path: Path) -> None:
    """N alpaca records from the GSM8K training problems, each instruction ending in its index."""
    problems = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            problem = problems[i % len(problems)]
            f.write(json.dumps({"instruction": f"{problem['question']} (#{i})", "output": problem["answer"]}) + "\n")


def _machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) * 1024
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu": model,
            "ram_gib": round(ram / 2**30, 1), "platform": platform.platform(), "python": platform.python_version()}


def _gb(value) -> str:
    return "" if value is None else f"{value / 1e9:.2f}"


def table(rows: list[dict]) -> str:
    head = ["N", "path", "procs", "first load+tokenize (s)", "cached load (s)", "peak RSS (GB)",
            "above bare (GB)", "largest child (GB)", "bare (GB)", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['n']:,}", r["path"], str(r["procs"]),
            "" if r.get("first_s") is None else f"{r['first_s']:.1f}",
            "" if r.get("cached_s") is None else f"{r['cached_s']:.2f}",
            _gb(r.get("peak_rss")), _gb(r.get("above_bare")), _gb(r.get("peak_rss_children")), _gb(r.get("bare_rss")),
            r.get("note", ""),
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="record counts")
    parser.add_argument("--old-max", type=int, default=100_000,
                        help="largest N that runs the old path and new-1proc (above: old extrapolated)")
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--work", help="folder for the data files and caches (default: a temporary one, deleted)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--variant", choices=["old", "new-1proc", "new-first", "new-cached"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="qtune-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    measured, rows = {}, []
    try:
        for n in args.n:
            data = work / f"records-{n}.jsonl"
            make_records(n, data)
            cache = work / f"cache-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            variants = (["old", "new-1proc"] if n <= args.old_max else []) + ["new-first", "new-cached"]
            for variant in variants:
                if variant == "new-first":
                    shutil.rmtree(cache, ignore_errors=True)  # new-1proc filled it
                command = [sys.executable, __file__, "--variant", variant, "--data", str(data), "--cache-dir",
                           str(cache), "--tokenizer", args.tokenizer, "--max-length", str(args.max_length)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                measured[(n, variant)] = result = json.loads(out.strip().splitlines()[-1])
                print(f"N={n} {variant}: {result['seconds']:.1f} s, peak RSS {_gb(result['peak_rss'])} GB",
                      file=sys.stderr, flush=True)
            first, cached = measured[(n, "new-first")], measured[(n, "new-cached")]
            if (n, "old") in measured:
                old = measured[(n, "old")]
                same = "identical samples (sha256)" if old["sha256"] == cached["sha256"] else "SAMPLES DIFFER"
                rows.append({"n": n, "path": "old: list of dicts", "procs": 1, "first_s": old["seconds"],
                             "peak_rss": old["peak_rss"], "above_bare": old["peak_rss"] - old["bare_rss"],
                             "bare_rss": old["bare_rss"], "note": f"every command; {same}"})
                single = measured[(n, "new-1proc")]
                rows.append({"n": n, "path": "new: Arrow, num_proc=1", "procs": 1, "first_s": single["seconds"],
                             "peak_rss": single["peak_rss"], "above_bare": single["peak_rss"] - single["bare_rss"],
                             "bare_rss": single["bare_rss"], "note": "cache empty"})
            elif any(variant == "old" for _, variant in measured):
                base = max(m for m, variant in measured if variant == "old")
                old, scale = measured[(base, "old")], n / base
                rows.append({"n": n, "path": "old: list of dicts", "procs": 1, "first_s": old["seconds"] * scale,
                             "peak_rss": old["bare_rss"] + (old["peak_rss"] - old["bare_rss"]) * scale,
                             "above_bare": (old["peak_rss"] - old["bare_rss"]) * scale,
                             "bare_rss": old["bare_rss"], "note": f"ESTIMATED: {base:,} x {scale:g}, not run"})
            rows.append({"n": n, "path": "new: Arrow, default num_proc", "procs": first["procs"],
                         "first_s": first["seconds"], "cached_s": cached["seconds"],
                         "peak_rss": max(first["peak_rss"], cached["peak_rss"]),
                         "above_bare": max(first["peak_rss"] - first["bare_rss"], cached["peak_rss"] - cached["bare_rss"]),
                         "peak_rss_children": first["peak_rss_children"], "bare_rss": first["bare_rss"],
                         "note": (f"cached load peak {_gb(cached['peak_rss'])} GB; one pass over all samples "
                                  f"{cached['pass_seconds']:.1f} s (RSS after it {_gb(cached['rss_after_pass'])} GB, "
                                  f"mapped pages); entry {_gb(first['cache_entry_bytes'])} GB on disk")})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    summary = {
        "command": "python bench/data_pipeline.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "tokenizer": args.tokenizer, "max_length": args.max_length,
        "rows": rows,
        "measurements": [{"n": n, **m} for (n, _), m in measured.items()],
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
