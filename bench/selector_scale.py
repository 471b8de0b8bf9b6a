"""Benchmark: every `qtune select` selector's time and peak memory at 10 k, 100 k and 1 M records
(issue 30, item 2; the table of docs/select.md, "Selectors at scale").

    python bench/selector_scale.py [--n 10000 100000 1000000] [--selectors random,hardness,...]
                                   [--limit-s 3600] [--out runs/selector-scale]
    python bench/selector_scale.py --report runs/selector-scale      (the table again)

Records: GSM8K-style problems of the saturated testbed's generator (`make_splits` with
train_size N: the preset's defect mix, one draw per N), written once to OUT/data-N.jsonl; the
target set of `less` and `rds` is the preset's own dev split (300 clean problems). The model is
the testbed's shipped 0.96 M-parameter Llama: the selectors that rank by the scoring pass
(perplexity, ifd, qtuning) run it; those that need no pass run with `--no-scores`, and the model
is then loaded only by the selectors that compute with it (less, rds, grads, thtb's judge);
`diversity` embeds with the same model (`--embedding-model`: d = its hidden size, not
all-MiniLM's 384), and `thtb`'s judge is that model too (`--judge-model`: a model that cannot
follow the judge's prompt, so every answer is unparseable, but the generation costs what it
costs; no `--judge-field`, so no quality stage). One torch thread per run (THREADS).

Each run is one `qtune select --ratio 0.25 --no-plot` in a fresh process under /usr/bin/time -v
(wall seconds, peak RSS), after a first run per N that fills the tokenized cache (its time is
reported apart, as "tokenize"), so every selector's time is that of a cached load plus its own
work. A run whose linear extrapolation from its largest finished N passes --limit-s is not
started (marked "not run: at least X s"); a run that passes --limit-s is stopped and marked so.
Results append to OUT/results.jsonl (resumable: a finished (selector, N) is not rerun), and the
table is printed and written to OUT/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

#: Each selector's extra options and its complexity in the records N (L tokens a record, K = ratio
#: x N kept, d the embedding or hidden size, P trainable parameters, Q target records, k clusters,
#: M the silhouette's sample per cluster, B the diversity block, G generated tokens a record).
SELECTORS = {
    "random": ([ "--no-scores"], "O(N) (read and tokenize)"),
    "full": (["--no-scores"], "O(N)"),
    "perplexity": ([], "O(N L) forward passes + O(N log N) ranking"),
    "qtuning": ([], "O(N L) forward passes + O(N log N) quantiles"),
    "ifd": ([], "O(N L) forward passes, twice"),
    "hardness": (["--no-scores"], "TF-IDF O(N L); k-means O(iterations x k x N L); sampled silhouette O(N k M L)"),
    "diversity": (["--no-scores"], "O(N L) embedding + k-center greedy O(K d min(N, B))"),
    "rds": (["--no-scores"], "O((N + Q) L) forward passes + O(N Q d) cosines"),
    "less": (["--no-scores"], "warm-up O(0.05 N L x epochs) + per checkpoint O((N + Q) (L + P x dim))"),
    "grads": (["--no-scores"], "warm-up + O(N L) per-sample gradients of embedding and head"),
    "thtb": (["--no-scores"], "judge O(N G) generation (cached) + hardness's"),
}
TARGETED = {"less", "rds"}
#: Torch threads of every run: one, so that a run's time does not hinge on how many cores other
#: jobs leave it (on this 2-core machine two threads beside another job ran 2.5-4.6x slower).
THREADS = 1


def write_data(out: Path, n: int) -> Path:
    """OUT/data-N.jsonl: N training records of the saturated generator (written once)."""
    path = out / f"data-{n}.jsonl"
    if not path.exists():
        from qtune.testbed.saturated import SaturatedConfig, make_splits

        train, _, _ = make_splits(dataclasses.replace(SaturatedConfig(), train_size=n))
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for record in train:
                f.write(json.dumps(record) + "\n")
        tmp.replace(path)
    return path


def timed(command: list[str], limit: float) -> dict:
    """Wall seconds and peak RSS of `command` under /usr/bin/time -v, stopped after `limit` s; one
    torch thread (THREADS)."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    try:
        done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, timeout=limit,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"stopped after {limit:.0f} s"}
    seconds = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0:
        return {"status": "failed", "error": done.stderr[-2000:]}
    return {"status": "ok", "seconds": seconds, "peak_rss_gb": int(peak.group(1)) * 1024 / 1e9 if peak else None}


def finished(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def table(rows: list[dict], sizes: list[int]) -> str:
    by = {(r["selector"], r["n"]): r for r in rows}
    head = ["selector", "complexity", *[f"{n:,}: s / peak GB" for n in sizes]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(sizes)]
    for name in ["tokenize", *SELECTORS]:
        cells = []
        for n in sizes:
            r = by.get((name, n))
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(f"{r['seconds']:,.1f} / {r['peak_rss_gb']:.2f}")
            else:
                cells.append(r["status"])
        if any(cells):
            complexity = "first load: tokenize into the cache" if name == "tokenize" else SELECTORS[name][1]
            lines.append(f"| {name} | {complexity} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--selectors", default=",".join(SELECTORS))
    parser.add_argument("--limit-s", type=float, default=3600.0)
    parser.add_argument("--out", default="runs/selector-scale")
    parser.add_argument("--report", action="store_true", help="Print the table of OUT and stop.")
    ns = parser.parse_args(argv)
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if ns.report:
        print(table(finished(out), sorted({r["n"] for r in finished(out)})))
        return
    from qtune.testbed import build_testbed

    paths = build_testbed(preset="saturated", progress=False)
    model = str(paths.model_dir)
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    for n in sorted(ns.n):
        data = write_data(out, n)
        for name in ["tokenize", *ns.selectors.split(",")]:
            if any(r["selector"] == name and r["n"] == n for r in finished(out)):
                continue
            done = [r for r in finished(out) if r["selector"] == name and r["status"] == "ok"]
            row = {"selector": name, "n": n}
            if done:
                largest = max(done, key=lambda r: r["n"])
                estimate = largest["seconds"] * n / largest["n"]
                if estimate > ns.limit_s:
                    row.update(status=f"not run: at least {estimate:,.0f} s")
            if "status" not in row:
                selector = "random" if name == "tokenize" else name
                options = [] if name == "tokenize" else SELECTORS[name][0]
                command = [sys.executable, "-m", "qtune.cli", "select", "--model", model, "--data", str(data),
                           "--out", str(out / "select" / f"{name}-{n}"), "--selector", selector, "--ratio", "0.25",
                           "--no-plot", *options]
                if name in TARGETED:
                    command += ["--target-data", str(paths.dev_path)]
                if name == "diversity":
                    command += ["--embedding-model", model]
                if name == "thtb":
                    command += ["--judge-model", model]
                if name == "tokenize":
                    command += ["--no-scores"]
                print(f"{name} at {n:,} records ...", flush=True)
                row.update(timed(command, ns.limit_s))
            row.update(machine=machine, load_before=os.getloadavg()[0],
                       finished_at=datetime.datetime.now().isoformat(timespec="seconds"),
                       command="python bench/selector_scale.py " + " ".join(argv or sys.argv[1:]))
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  {row['status']}" + (f": {row['seconds']:.1f} s, {row['peak_rss_gb']:.2f} GB" if row["status"] == "ok" else ""),
                  flush=True)
    report = table(finished(out), sorted(ns.n))
    (out / "results.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
