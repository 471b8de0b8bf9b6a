"""Benchmark: cost of EU scoring relative to a plain no-grad forward over the same batches.

Each variant runs in its own fresh process so that peak memory is measured cleanly:
on CUDA with `torch.cuda.max_memory_allocated`, on CPU as the rise of the process's peak RSS
above its RSS once the model and batches exist. Variants alternate (forward, score, forward, ...)
and the ratio of medians is reported, measured side by side in one run.

    python bench/score_overhead.py                   # vocab 32k, hidden 512, 8 layers, CPU
    python bench/score_overhead.py --hidden 256 --layers 4   # the harshest case: a tiny body
    python bench/score_overhead.py --vocab 151936 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtune.scoring import score_batch

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         max_position_embeddings=args.length)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
        labels = ids.clone()
        prompt = int(args.length * args.prompt_share)
        labels[:, :prompt] = -100
        batches.append((ids.to(device), torch.ones_like(ids, device=device), labels.to(device)))

    def one_pass():
        for ids, mask, labels in batches:
            if args.variant == "forward":
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask).logits
            else:
                score_batch(model, ids, mask, labels, chunk_tokens=args.chunk_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # The first pass warms up allocators and kernels; report the best of the rest.
    return {"variant": args.variant, "seconds": min(times[1:]) if len(times) > 1 else times[0], "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prompt-share", type=float, default=0.35,
                        help="share of each sequence that is prompt (GSM8K: about 0.45 by characters; 0.35 is conservative)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating forward/score process pairs")
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variant", choices=["forward", "score"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = {"forward": [], "score": []}
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if args.json:
        i = passthrough.index(args.json) if args.json in passthrough else None
        if i is not None:
            del passthrough[i]
    for _ in range(args.rounds):
        for variant in ("forward", "score"):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--variant", variant],
                                 check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    fwd_t = statistics.median(r["seconds"] for r in results["forward"])
    sco_t = statistics.median(r["seconds"] for r in results["score"])
    fwd_m = statistics.median(r["peak_bytes"] for r in results["forward"])
    sco_m = statistics.median(r["peak_bytes"] for r in results["score"])
    summary = {
        "command": "python bench/score_overhead.py " + " ".join(passthrough),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cpus, {args.device}",
        "setup": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "batch", "length", "prompt_share",
                                                 "batches", "chunk_tokens", "device", "dtype")},
        "forward_seconds": fwd_t, "score_seconds": sco_t, "time_ratio": sco_t / fwd_t,
        "forward_peak_mib": fwd_m / 2**20, "score_peak_mib": sco_m / 2**20, "memory_ratio": sco_m / fwd_m,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
