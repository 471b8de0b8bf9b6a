"""Benchmark (not a test): what a Q-Tuning step costs, measured side by side in one run.

Five measurements, each printed as a table and written to OUT/step_cost.json (and the plot to
OUT/memory_vs_vocab.png):

1. step    Q-Tuning's step time against its analytic bound (F + r x T) / T, with F a no-grad
           forward of the batch (the model's own logits), T a full-data training step of the same
           batch (`qtune.step.train_step` with `full`, then the optimizer step), at r = 0.25 and
           0.125 (r_sample = r, r_token = 1: r is the share of samples). The bound is also given
           with the measured share of trained input tokens (Q-Tuning's kept rows are not exactly
           r of the tokens). Target: step / bound <= 1.05. --step-methods adds other methods at the
           same ratios (--r-token: their token ratio); a method without a scoring pass (random)
           has the bound r x T / T.
2. scoring The scoring pass (`score_batch`) against a body-only forward (the decoder without its
           output projection), time and peak memory, per head path (chunked, logits), at each
           vocabulary and sequence length asked for. Target: <= 1.1x time and memory.
3. vocab   Peak memory of scoring and of a training loss (forward + backward of one micro-batch)
           against the vocabulary size, per head path (chunked, logits; liger on CUDA when
           installed): flat with the chunked path, rising with the logits path.
4. triage  Sample triage plus token pruning (the `qtuning` method's decision) for 1,024 samples x
           2,048 response tokens, on the CPU. Target: under 50 ms.
5. methods Each method's step against the full-data step of the same batch (--methods; r_sample
           0.25, r_token 0.7): the cost per step of docs/methods.md.

On CUDA, time is measured between synchronisations and memory is `torch.cuda.max_memory_allocated`
above what was allocated before (weights, optimizer state and batches included in neither). On
the CPU, items 2 and 3 run each variant in a fresh process and report the rise of its peak RSS
(VmHWM, reset once model and batches exist) above its RSS at that point. Variants alternate within each repeat, so drift hits all alike; medians.

Model FLOPs utilisation (CUDA): (6 x N x trained tokens + 2 x N x scored tokens) / step time /
peak, with N the parameter count (embeddings included when tied to the head, as they then do the
projection's work) and the peak bf16 dense rate given by --peak-tflops (989 for H100 and H200 SXM).

    python bench/step_cost.py --out runs/step_cost                      # CPU, tiny model
    python bench/step_cost.py --model smollm2-135m-instruct --data ../shared/data/gsm8k/train.jsonl \
        --items step --ratios 0.25 --step-methods random,qtuning --r-token 0.5 --lora-r 8 \
        --batch 8 --grad-accum 2 --length 512 --out runs/step_cost_smollm2    # the real model, GSM8K batches
    python bench/step_cost.py --preset qwen2-0.5b --device cuda --dtype bfloat16 --out runs/gpu05
    python bench/step_cost.py --preset qwen2-1.5b --device cuda --dtype bfloat16 --items step,scoring
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

#: Model shapes: (hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings).
PRESETS = {
    "tiny": (256, 4, 4, 2, 1024, 32000, False),
    "qwen2-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
}


def build_model(args, vocab: int | None = None):
    """The preset's shape with random weights, or with --model the named model (its weights; LoRA
    adapters with --lora-r)."""
    if args.model:
        from qtune.models import load_model
        from qtune.train import apply_lora

        model = load_model(args.model, dtype=args.dtype, device=args.device)
        if args.lora_r:
            model = apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, target="all-linear")
        return model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, default_vocab, tied = PRESETS[args.preset]
    config = Qwen2Config(vocab_size=vocab or default_vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                         tie_word_embeddings=tied, max_position_embeddings=max(args.lengths + [args.length]),
                         attn_implementation=args.attn)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialised where it runs: fast on a GPU
        return Qwen2ForCausalLM(config).to(dtype=getattr(torch, args.dtype))


def make_batch(vocab: int, batch: int, length: int, prompt_share: float, device, seed: int = 0) -> dict:
    """Random tokens, the first `prompt_share` of each row a prompt; rows of lengths from 60% to
    100% of `length`, right-padded, as length-grouped data looks."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row in range(batch):
        n = length - int(0.4 * length * row / max(batch - 1, 1))
        mask[row, n:] = 0
        labels[row, n:] = -100
        labels[row, : int(prompt_share * n)] = -100
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_id": torch.arange(batch) + seed * batch}
    return {k: v.to(device) for k, v in out.items()}


def step_batches(args, vocab: int) -> tuple[list[dict], int]:
    """(the `grad_accum` micro-batches of one step, the pad token id): with --data, its first
    records tokenized with --model's tokenizer (at most --length tokens each); else random tokens
    (`make_batch`)."""
    if not args.data:
        return [make_batch(vocab, args.batch, args.length, args.prompt_share, args.device, seed=i)
                for i in range(args.grad_accum)], 0
    from qtune.config import TrainConfig
    from qtune.data import collate
    from qtune.models import load_tokenizer
    from qtune.samples import load_samples

    tokenizer = load_tokenizer(args.model)
    n = args.batch * args.grad_accum
    _, samples = load_samples(TrainConfig(model=args.model, data=args.data, out="o", limit=n, max_length=args.length),
                              tokenizer)
    if len(samples) < n:
        raise SystemExit(f"{args.data}: {len(samples)} samples, {n} needed (--batch x --grad-accum)")
    batches = []
    for i in range(args.grad_accum):
        batch = collate([samples[j] for j in range(i * args.batch, (i + 1) * args.batch)], tokenizer.pad_token_id)
        batches.append({k: v.to(args.device) for k, v in batch.items()})
    return batches, tokenizer.pad_token_id


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternating_medians(variants: dict, args) -> dict[str, float]:
    """Median seconds of each variant: one warm-up run each (kernels, allocator, optimizer
    state), then `args.repeats` rounds in which the variants alternate, so drift hits all alike."""
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for key, fn in variants.items():
            times[key].append(timed(fn, args.device))
    return {k: statistics.median(v) for k, v in times.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Start the process's peak RSS (VmHWM) afresh at its current RSS (Linux: clear_refs 5), so that
    building the model does not hide the variant's own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# ------------------------------------------------------------------------------------------ 1. step


def method_scorer(args, method, cfg, reference=None):
    """The `Scorer` a method's step needs (its `needs`: a reference model's losses, UDS's nuclear
    norms and sketches), with the benchmark's head options."""
    from qtune.logit_matrix import LogitSketch
    from qtune.scorer import Scorer

    sketch = LogitSketch(cfg.uds_sketch_rows, cfg.uds_sketch_columns) if "logit_sketch" in method.needs else None
    return Scorer(chunk_tokens=args.chunk_tokens, head_impl=args.head_impl, layers=args.score_layers,
                  reference=reference if "reference_nll" in method.needs else None,
                  nuclear_norm="nuclear_norm" in method.needs, logit_sketch=sketch)


def measure_step(args) -> dict:
    from qtune.config import TrainConfig
    from qtune.methods import build_method
    from qtune.phases import PhaseClock
    from qtune.step import train_step

    model = build_model(args)
    vocab = model.config.vocab_size
    batches, pad_token_id = step_batches(args, vocab)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def method(name, r):
        cfg = TrainConfig(model="m", data="d", out="o", method=name, r_sample=r,
                          r_token=1.0 if name == "full" else args.r_token)
        return build_method(name, cfg), cfg

    shares = {}
    padding = {}
    loss_shares = {}

    def step(m, cfg, key):
        scorer = method_scorer(args, m, cfg)

        def run(clock=None):
            model.train()
            plan, _ = train_step(model, batches, m, step=0, total_steps=1, pad_token_id=pad_token_id,
                                 chunk_tokens=args.chunk_tokens, head_impl=args.head_impl, clock=clock,
                                 kept_row_layout=args.kept_row_layout, scorer=scorer)
            if clock is not None:
                with clock.phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            shares[key] = plan.record["trained_input_tokens"] / plan.record["input_tokens"]
            padding[key] = 1 - plan.record["trained_input_tokens"] / plan.record["trained_positions"]
            loss_shares[key] = plan.record["kept_tokens"] / plan.record["response_tokens"]
        return run

    def forward():
        model.eval()
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    variants = {"F": forward, "T": step(*method("full", 1.0), "T")}
    scored = {}  # whether a variant's method runs the scoring pass, so that F is in its bound
    for r in args.ratios:
        for name in args.step_methods:
            m, cfg = method(name, r)
            variants[step_key(name, r)] = step(m, cfg, step_key(name, r))
            scored[step_key(name, r)] = bool(m.needs)
    med = alternating_medians(variants, args)
    phases = {}
    for key, fn in variants.items():  # once more with a clock: where the time goes
        if key != "F":
            clock = PhaseClock(args.device)
            fn(clock)
            phases[key] = {k: round(v * 1000, 2) for k, v in clock.seconds.items()}
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"forward_s": med["F"], "full_step_s": med["T"], "tokens_per_step": tokens, "params": n_params,
           "phase_ms": phases, "padding_share": padding,
           "full_tokens_per_s": tokens / med["T"], "ratios": []}
    peak = args.peak_tflops * 1e12
    for r in args.ratios:
        for name in args.step_methods:
            key = step_key(name, r)
            q, share = med[key], shares[key]
            forward_s = med["F"] if scored[key] else 0.0
            bound = (forward_s + r * med["T"]) / med["T"]
            bound_measured = (forward_s + share * med["T"]) / med["T"]
            row = {"method": name, "r": r, "r_token": args.r_token, "scored": scored[key], "step_s": q,
                   "step_vs_full": q / med["T"], "bound": bound, "vs_bound": q / med["T"] / bound,
                   "trained_token_share": share, "bound_measured_share": bound_measured,
                   "vs_bound_measured_share": q / med["T"] / bound_measured, "tokens_per_s": tokens / q,
                   "padding_share": padding[key], "loss_token_share": loss_shares[key]}
            if torch.device(args.device).type == "cuda":
                row["mfu"] = (6 * n_params * share * tokens + 2 * n_params * tokens * scored[key]) / q / peak
            out["ratios"].append(row)
    if torch.device(args.device).type == "cuda":
        out["full_mfu"] = 6 * n_params * tokens / med["T"] / peak
        torch.cuda.reset_peak_memory_stats()
        variants[step_key(args.step_methods[0], args.ratios[0])]()
        out["qtuning_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        variants["T"]()
        out["full_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def step_key(method: str, r: float) -> str:
    """A step variant's key: Q0.25 for Q-Tuning (as before other methods were measured), else method@r."""
    return f"Q{r:g}" if method == "qtuning" else f"{method}@{r:g}"


# ------------------------------------------------------------------- 2./3. one variant, its memory


_MODELS: dict = {}  # on CUDA, the model of the last vocabulary, reused by its variants


def run_variant(args, kind: str, vocab: int, length: int, impl: str) -> dict:
    """Time and peak memory of one variant: body (body-only forward), score (score_batch), loss
    (forward + backward of one micro-batch)."""
    from qtune.scoring import score_batch
    from qtune.step import micro_batch_loss

    if vocab not in _MODELS:
        _MODELS.clear()
        _MODELS[vocab] = build_model(args, vocab)
    model = _MODELS[vocab]
    batch = make_batch(vocab, args.score_batch if length <= 1024 else max(1, args.score_batch * 1024 // length),
                       length, args.prompt_share, args.device)
    cuda = torch.device(args.device).type == "cuda"

    def body():
        with torch.no_grad():
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def score():
        score_batch(model, batch["input_ids"], batch["attention_mask"], batch["labels"], head_impl=impl,
                    chunk_tokens=args.chunk_tokens)

    def loss():
        value = micro_batch_loss(model, batch, 1000, head_impl=impl, chunk_tokens=args.chunk_tokens)
        value.backward()
        model.zero_grad(set_to_none=True)

    fn = {"body": body, "score": score, "loss": loss}[kind]
    model.train(kind == "loss")
    if cuda:
        fn()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss()
    times = [timed(fn, args.device) for _ in range(args.repeats)]
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - base
    return {"kind": kind, "vocab": vocab, "length": length, "impl": impl, "tokens": int(batch["attention_mask"].sum()),
            "seconds": statistics.median(times[1:] if len(times) > 1 else times), "peak_mib": peak / 2**20}


def variant(args, kind, vocab, length, impl) -> dict:
    """`run_variant` in this process on CUDA, in a fresh one on the CPU (for its peak RSS)."""
    try:
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
            return run_variant(args, kind, vocab, length, impl)
        command = [sys.executable, __file__, *sys.argv[1:], "--variant", f"{kind}:{vocab}:{length}:{impl}"]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (torch.cuda.OutOfMemoryError, subprocess.CalledProcessError) as exc:
        _MODELS.clear()
        return {"kind": kind, "vocab": vocab, "length": length, "impl": impl, "error": type(exc).__name__}


def impls(args) -> list[str]:
    from qtune.head import liger_available

    return ["chunked", "logits"] + (["liger"] if torch.device(args.device).type == "cuda" and liger_available() else [])


def measure_scoring(args) -> list[dict]:
    rows = []
    for vocab in args.vocabs:
        for length in args.lengths:
            body = variant(args, "body", vocab, length, "none")
            for impl in ("chunked", "logits"):
                score = variant(args, "score", vocab, length, impl)
                if "error" not in score and "error" not in body:
                    score["time_vs_body"] = score["seconds"] / body["seconds"]
                    score["memory_vs_body"] = score["peak_mib"] / max(body["peak_mib"], 1e-9)
                rows.append({"body": body, "score": score})
    return rows


def measure_vocab(args) -> list[dict]:
    return [variant(args, kind, vocab, args.length, impl)
            for vocab in args.vocab_sweep for kind in ("score", "loss") for impl in impls(args)
            if not (kind == "score" and impl == "liger")]


def plot_vocab(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, label in ((axes[0], "score", "scoring pass"), (axes[1], "loss", "training loss (fwd + bwd)")):
        for impl in sorted({r["impl"] for r in rows if r["kind"] == kind}):
            points = [(r["vocab"], r["peak_mib"]) for r in rows if r["kind"] == kind and r["impl"] == impl
                      and "error" not in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_title(label)
        ax.set_xlabel("vocabulary size")
        ax.set_ylabel("peak memory above weights and batch (MiB)")
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------- 5. methods


def measure_methods(args) -> dict:
    """Each method's step (scoring if it asks, decision, training of what it keeps, optimizer)
    against the full-data step of the same batch, variants alternating, medians. Rho-1's
    reference model is a second random model of the same shape (with --model, a second copy of it).
    A name METHOD/LOSS trains with that token objective (`full/asft`, `random/eaft`); ASFT without
    LoRA anchors to a second copy of the model, as Rho-1's reference."""
    from qtune.config import TrainConfig
    from qtune.methods import build_method
    from qtune.objectives import Objective
    from qtune.reference_policy import reference_policy
    from qtune.step import train_step

    model = build_model(args)
    vocab = model.config.vocab_size
    batches, pad_token_id = step_batches(args, vocab)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    reference = None
    kept = {}

    def step(name):
        nonlocal reference
        method_name, _, loss = name.partition("/")
        cfg = TrainConfig(model="m", data="d", out="o", method=method_name, r_sample=0.25, r_token=0.7,
                          loss=loss or "nll")
        method = build_method(method_name, cfg)
        if "reference_nll" in method.needs and reference is None:
            reference = build_model(args).eval()
        scorer = method_scorer(args, method, cfg, reference)
        objective = Objective.of(cfg)
        policy = reference_policy(objective, model, lambda: build_model(args).eval())
        # Step 0 every time (the same decisions at each repeat), but for PSFT, which copies its old
        # policy at the first step of each window: 1 step in loss_window pays for the copy.
        steps = iter(range(10**9))

        def run():
            model.train()
            plan, _ = train_step(model, batches, method, step=next(steps) if objective.reference == "old" else 0,
                                 total_steps=10, pad_token_id=pad_token_id, chunk_tokens=args.chunk_tokens,
                                 head_impl=args.head_impl, scorer=scorer, objective=objective, reference=policy)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            kept[name] = plan.record["kept_tokens"] / plan.record["response_tokens"]
        return run

    names = ["full", *[m for m in args.methods.split(",") if m != "full"]]
    med = alternating_medians({name: step(name) for name in names}, args)
    return {"full_step_s": med["full"], "r_sample": 0.25, "r_token": 0.7,
            "methods": [{"method": k, "step_s": med[k], "vs_full": med[k] / med["full"],
                         "loss_token_share": kept[k]} for k in names]}


# ---------------------------------------------------------------------------------------- 4. triage


def measure_triage(args) -> dict:
    from qtune.config import TrainConfig
    from qtune.methods import build_method
    from qtune.scoring import BatchScores

    samples, length = 1024, 2048
    g = torch.Generator().manual_seed(0)
    nll = torch.rand(samples, length, generator=g) * 4
    entropy = torch.rand(samples, length, generator=g) * 3
    mask = torch.ones(samples, length, dtype=torch.bool)
    mask[:, 0] = False
    n = mask.sum(1)
    scores = [BatchScores(nll, entropy, mask, torch.exp(nll.sum(1) / n), entropy.sum(1) / n, n)]
    batches = [{"input_ids": torch.zeros(samples, length, dtype=torch.long), "labels": torch.where(mask, 1, -100),
                "attention_mask": torch.ones(samples, length, dtype=torch.long), "sample_id": torch.arange(samples)}]
    method = build_method("qtuning", TrainConfig(model="m", data="d", out="o", method="qtuning"))
    method.select(batches, scores, 0)
    times, stages = [], []
    for _ in range(max(args.repeats, 5)):
        start = time.perf_counter()
        decision = method.select(batches, scores, 0)
        times.append(time.perf_counter() - start)
        stages.append(decision.stage_seconds)
    return {"samples": samples, "response_tokens": samples * (length - 1), "threads": torch.get_num_threads(),
            "ms": 1000 * statistics.median(times),
            "triage_ms": 1000 * statistics.median(s["triage"] for s in stages),
            "token_select_ms": 1000 * statistics.median(s["token_select"] for s in stages)}


# ------------------------------------------------------------------------------------------- main


def machine(args) -> str:
    if torch.device(args.device).type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_tables(result: dict) -> None:
    if "step" in result:
        s = result["step"]
        pad = s["padding_share"]
        print(f"\n1. step (F = {s['forward_s'] * 1000:.1f} ms, T = {s['full_step_s'] * 1000:.1f} ms, "
              f"{s['tokens_per_step']} tokens, padding share of T {pad['T']:.3f})")
        print("| method | r | step ms | step / T | bound | step / bound | trained token share | step / bound at that "
              "share | padding share | loss-token share |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in s["ratios"]:
            ratio = f"{r['r']:g} x {r['r_token']:g}" if "r_token" in r else f"{r['r']:g}"
            print(f"| {r.get('method', 'qtuning')} | {ratio} | {r['step_s'] * 1000:.1f} | {r['step_vs_full']:.3f} | "
                  f"{r['bound']:.3f} | **{r['vs_bound']:.3f}** | {r['trained_token_share']:.3f} | "
                  f"{r['vs_bound_measured_share']:.3f} | {r['padding_share']:.3f} | "
                  f"{r.get('loss_token_share', 1):.3f} |")
        print("\nphases of one step (ms): " + "; ".join(
            f"{k}: " + ", ".join(f"{p} {v}" for p, v in ph.items()) for k, ph in s["phase_ms"].items()))
    if "scoring" in result:
        print("\n2. scoring vs body-only forward")
        print("| vocab | tokens | path | time vs body | memory vs body | body ms | body MiB |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for row in result["scoring"]:
            b, s = row["body"], row["score"]
            if "error" in s or "error" in b:
                print(f"| {s['vocab']} | {s['length']} | {s['impl']} | {s.get('error', b.get('error'))} | | | |")
                continue
            print(f"| {s['vocab']} | {s['tokens']} | {s['impl']} | {s['time_vs_body']:.2f}x | "
                  f"{s['memory_vs_body']:.2f}x | {b['seconds'] * 1000:.1f} | {b['peak_mib']:.0f} |")
    if "vocab" in result:
        print("\n3. peak memory (MiB) against the vocabulary")
        print("| vocab | pass | path | peak MiB | ms |")
        print("|---:|---|---|---:|---:|")
        for r in result["vocab"]:
            value = r.get("error") or f"{r['peak_mib']:.0f} | {r['seconds'] * 1000:.1f}"
            print(f"| {r['vocab']} | {r['kind']} | {r['impl']} | {value} |")
    if "methods" in result:
        m = result["methods"]
        print(f"\n5. cost per step against full data (r_sample {m['r_sample']}, r_token {m['r_token']}; "
              f"full step {m['full_step_s'] * 1000:.1f} ms)")
        print("| method | step ms | step / full | loss-token share |")
        print("|---|---:|---:|---:|")
        for row in m["methods"]:
            print(f"| {row['method']} | {row['step_s'] * 1000:.1f} | {row['vs_full']:.3f} | {row['loss_token_share']:.3f} |")
    if "triage" in result:
        t = result["triage"]
        print(f"\n4. triage + token pruning, {t['samples']} samples x {t['response_tokens'] // t['samples']} response "
              f"tokens, CPU, {t['threads']} threads: **{t['ms']:.1f} ms** (triage {t['triage_ms']:.1f}, "
              f"token selection {t['token_select_ms']:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (random weights)")
    parser.add_argument("--model", default=None,
                        help="a real model instead of the preset (as qtune's --model takes it: a known name such as "
                             "smollm2-135m-instruct, a folder, a .gguf file); items step and methods only")
    parser.add_argument("--data", default=None,
                        help="with --model: the step's batches are this file's first --batch x --grad-accum records "
                             "(at most --length tokens each) instead of random tokens")
    parser.add_argument("--lora-r", type=int, default=0, help="with --model: LoRA rank (all linear layers, alpha 2r); "
                        "0 trains every weight")
    parser.add_argument("--step-methods", default="qtuning",
                        help="methods measured in item 1 at each ratio r of --ratios (r_sample = r, "
                             "r_token = --r-token)")
    parser.add_argument("--r-token", type=float, default=1.0, help="token ratio of the methods of item 1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--items", default="step,scoring,vocab,triage", help="which of the five to run (step, scoring, vocab, triage, methods)")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch of the step (item 1)")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (item 1)")
    parser.add_argument("--length", type=int, default=256, help="tokens per row, items 1 and 3")
    parser.add_argument("--ratios", default="0.25,0.125", help="sample ratios r of item 1")
    parser.add_argument("--vocabs", default="32000,151936", help="vocabularies of item 2")
    parser.add_argument("--lengths", default="1024,4096", help="sequence lengths of item 2")
    parser.add_argument("--score-batch", type=int, default=4,
                        help="rows per scoring batch at 1,024 tokens (item 2; fewer rows for longer ones, "
                             "same tokens)")
    parser.add_argument("--vocab-sweep", default="8000,32000,64000,128000,151936", help="vocabularies of item 3")
    parser.add_argument("--prompt-share", type=float, default=0.4, help="share of each row that is prompt")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="positions projected at once (default 128 on the CPU; 1024 on CUDA, where larger "
                             "matrix products keep the GPU busy and 1024 x 152k float32 is only 0.6 GB)")
    parser.add_argument("--head-impl", default="auto", help="head path of the step (item 1)")
    parser.add_argument("--kept-row-layout", default="auto", help="kept-row layout of the step (item 1)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flex_attention, "
                        "flash_attention_2 where installed)")
    parser.add_argument("--score-layers", type=int, default=0,
                        help="score with the first N decoder layers (item 1; 0: all, as the paper)")
    parser.add_argument("--methods", default="random,qtuning,longest+perplexity,entropy+random,infobatch+all,"
                        "random+rho1", help="methods of item 5 (full is always measured); METHOD/LOSS trains "
                        "with that token objective (full/asft, full/psft, full/eaft)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (for the MFU)")
    parser.add_argument("--out", default="runs/step_cost", help="folder for step_cost.json and the plot")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.vocabs = [int(x) for x in args.vocabs.split(",")]
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.vocab_sweep = [int(x) for x in args.vocab_sweep.split(",")]
    args.step_methods = args.step_methods.split(",")
    if args.model and set(args.items.split(",")) - {"step", "methods", "triage"}:
        parser.error("--model measures the items step, methods and triage (the others sweep random shapes)")
    if args.data and not args.model:
        parser.error("--data needs --model (its tokenizer)")
    if args.chunk_tokens is None:
        args.chunk_tokens = 1024 if torch.device(args.device).type == "cuda" else 128
    if args.variant:
        kind, vocab, length, impl = args.variant.split(":")
        print(json.dumps(run_variant(args, kind, int(vocab), int(length), impl)))
        return
    items = args.items.split(",")
    result = {"command": "python bench/step_cost.py " + " ".join(sys.argv[1:]), "machine": machine(args),
              "date": time.strftime("%Y-%m-%d"), "preset": args.model or args.preset, "dtype": args.dtype,
              "chunk_tokens": args.chunk_tokens, "lora_r": args.lora_r}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for item, fn in (("triage", measure_triage), ("step", measure_step), ("methods", measure_methods),
                     ("scoring", measure_scoring),
                     ("vocab", measure_vocab)):
        if item in items:
            print(f"running {item} ...", file=sys.stderr, flush=True)
            result[item] = fn(args)
            (out / "step_cost.json").write_text(json.dumps(result, indent=1))
    if "vocab" in result:
        plot_vocab(result["vocab"], out / "memory_vs_vocab.png",
                   f"{args.preset}, {args.dtype}, {args.length} tokens x {args.score_batch} rows; {result['machine']}")
    print(f"{result['command']}\n{result['machine']}, {result['date']}")
    print_tables(result)


if __name__ == "__main__":
    main()
