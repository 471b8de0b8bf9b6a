"""`qtune rl` as a Python function: `run_rl(RLConfig(...))`.

The run, in its claimed folder OUT:

1. the options become TRL's `GRPOConfig` (under torchrun or accelerate launch this joins the
   process group); OUT is prepared as `qtune train` prepares it (`--resume` needs a complete
   checkpoint and the same options, `OUT/run_config.json`);
2. the start model (full weights, or a LoRA adapter that keeps training) and the prompts are loaded;
   the rewards are resolved by name or import path and bound to the run's options;
3. with `filter_zero_variance`, the pre-pass (`qtune.rl.zero_variance`) drops the prompts whose
   group rewards all agree; its verdict is kept in `OUT/zero_variance.json`, which a resumed run
   reads instead of sampling again;
4. `QTuneGRPOTrainer` trains (TRL's GRPO step, with the SFT terms of `sft_weight` and
   `interleave_sft` on the records' reference answers, tokenized as `qtune train` tokenizes them:
   `qtune.rl.sft_mix`), logging every step to `OUT/steps.jsonl` and `report_to`, evaluating on
   `eval_data` when asked, checkpointing every `save_steps`;
5. `OUT/model` (full weights; with a LoRA start the adapter, or the merged model with
   `merge_lora`), gathered by every process under any engine
   (`qtune.engine.save_trained_model`) and, last, `OUT/summary.json` with the engine that ran and
   the number of processes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback

from ..config import EvalConfig
from ..console import log
from ..data import load_records
from ..engine import check_launcher, engine_scope, gathered_parameters, save_trained_model
from ..errors import QTuneError
from ..io import claim_output_dir, write_json
from ..models import machine_stamp, resolve_device, resolve_dtype
from ..rewards import bind_options, parse_spec, resolve
from ..processes import launcher_world_size
from ..run_log import read_step_log
from ..train import CHECKPOINTING, prepare_folder, resume_point
from .config import RLConfig
from .prompts import demonstrations, load_policy, load_prompts
from .sft_mix import SFTMix

try:  # the GRPO step is TRL's, an optional dependency
    from .trainer import HELDOUT, STEP_LOG, QTuneGRPOTrainer, RewardProgress
    from .zero_variance import prune_zero_variance
except ModuleNotFoundError as exc:
    if exc.name != "trl":
        raise
    raise QTuneError("qtune rl needs TRL: pip install 'qtune[trl]'") from None

#: The pre-pass's verdict and report, kept so that a resumed run trains on the same prompts.
ZERO_VARIANCE = "zero_variance.json"


def build_rewards(cfg: RLConfig) -> tuple[list, list[float]]:
    """The reward functions of `cfg.rewards` (options they ask for bound to the run's values) and
    their weights."""
    options = asdict(cfg)
    funcs, weights = [], []
    for spec in cfg.rewards:
        name, weight = parse_spec(spec)
        funcs.append(bind_options(resolve(name), options))
        weights.append(weight)
    return funcs, weights


def grpo_config(cfg: RLConfig, out: Path):
    """TRL's GRPOConfig of a run. A combination TRL refuses (batch_size x grad_accum x processes
    not a multiple of num_generations, ...) is a one-line QTuneError."""
    from trl import GRPOConfig

    device = resolve_device(cfg.device)
    if cfg.use_vllm and importlib.util.find_spec("vllm") is None:
        raise QTuneError("--use-vllm needs vLLM, which is not installed: pip install 'trl[vllm]' (a CUDA machine)")
    if cfg.dtype == "float16":
        raise QTuneError("float16 training is not supported; use bfloat16 or float32")
    vllm = {"vllm_server_base_url": cfg.vllm_server_base_url} if cfg.vllm_server_base_url else {}
    try:
        return GRPOConfig(
            output_dir=str(out),
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            max_steps=cfg.max_steps,
            learning_rate=cfg.lr,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the steps
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            beta=cfg.beta,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            num_iterations=cfg.num_iterations,
            loss_type=cfg.loss_type,
            scale_rewards=cfg.scale_rewards,
            mask_truncated_completions=cfg.mask_truncated_completions,
            reward_weights=[parse_spec(spec)[1] for spec in cfg.rewards],
            seed=cfg.seed,
            data_seed=cfg.seed,
            bf16=resolve_dtype(cfg.dtype, device) == torch.bfloat16,
            use_cpu=device.type == "cpu",
            ddp_backend="gloo" if device.type == "cpu" and launcher_world_size() > 1 else None,
            ddp_find_unused_parameters=False,  # the policy's trainable parameters all take part in its loss
            **{CHECKPOINTING: cfg.gradient_checkpointing},
            use_vllm=cfg.use_vllm,
            vllm_mode=cfg.vllm_mode,
            **vllm,
            save_strategy="steps",
            save_steps=cfg.save_steps,
            save_total_limit=None,  # QTuneGRPOTrainer rotates, counting complete checkpoints only
            logging_steps=1,  # one record per step
            report_to=[] if cfg.report_to == "none" else [cfg.report_to],
            disable_tqdm=True,  # replaced by RewardProgress
            dataloader_num_workers=0,
            fsdp=cfg.fsdp or "",
            fsdp_config=cfg.fsdp_config,
            deepspeed=cfg.deepspeed,
        )
    except ValueError as exc:
        raise QTuneError(f"GRPO refuses these options: {str(exc).strip().splitlines()[0]}") from None


def run_rl(cfg: RLConfig) -> dict:
    """GRPO from an SFT output on prompts with checkable answers; writes OUT/model, OUT/steps.jsonl
    and OUT/summary.json (see the module doc). OUT is claimed first: a second run on it is refused
    before anything loads."""
    out = Path(cfg.out)
    check_launcher(cfg.deepspeed)
    with engine_scope():
        args = grpo_config(cfg, out)
        main = args.should_save
        with claim_output_dir(out, "qtune rl") if main else contextlib.nullcontext():
            with args.main_process_first(desc="preparing the output folder"):
                resume_from = prepare_folder(cfg, out) if main else resume_point(cfg, out)
            return _rl(cfg, out, args, resume_from)


def _zero_variance_verdict(cfg: RLConfig, out: Path, args, model, tokenizer, prompts, funcs, weights) -> dict:
    """The pre-pass's report (with its per-prompt verdicts): read from OUT when a run already made
    it, else made by the main process and written before the other processes read it (under
    ZeRO-3, with the start model's weights gathered on every process meanwhile)."""
    path = out / ZERO_VARIANCE
    with gathered_parameters(model), args.main_process_first(desc="zero-variance pre-pass"):
        if not path.exists():
            log(f"zero-variance pre-pass: {cfg.num_generations} completions for each of {len(prompts)} prompts")
            device = torch.device(args.device)
            _, report = prune_zero_variance(
                model.to(device), tokenizer, prompts, funcs, weights, num_generations=cfg.num_generations,
                temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_completion_length,
                prompts_per_batch=max(1, cfg.batch_size // cfg.num_generations), seed=cfg.seed)
            write_json(path, report)
        report = json.loads(path.read_text(encoding="utf-8"))
    log(f"zero-variance pre-pass: {report['dropped']} of {report['prompts']} prompts dropped "
        f"(constant total reward: {report['dropped_by_reward']}), {report['seconds']:.1f} s")
    return report


def _rl(cfg: RLConfig, out: Path, args, resume_from: Path | None) -> dict:
    """run_rl's work, in its prepared folder."""
    from datasets import Dataset

    main = args.should_save
    model, tokenizer, adapter = load_policy(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                            pad_token=cfg.pad_token)
    prompts = load_prompts(cfg.data, tokenizer, format=cfg.format, skip_invalid=cfg.skip_invalid, limit=cfg.limit)
    funcs, weights = build_rewards(cfg)
    sft_mix = SFTMix.of(cfg)
    # From every record, before the zero-variance filter: an all-wrong prompt's reference is what
    # SFT can teach (ReLIFT); CHORD draws from the whole training data.
    experts = demonstrations(prompts.records, tokenizer, cfg.sft_max_length) if sft_mix.active else None
    if sft_mix.active and not experts:
        raise QTuneError(f"{cfg.data}: no expert demonstration for sft_weight / interleave_sft: every record's "
                         f"prompt fills sft_max_length ({cfg.sft_max_length}) tokens, leaving none of its reference "
                         "answer; raise --sft-max-length")
    report = None
    if cfg.filter_zero_variance:
        report = _zero_variance_verdict(cfg, out, args, model, tokenizer, prompts, funcs, weights)
        kept = {g["sample_id"] for g in report["groups"] if g["kept"]}
        prompts = prompts.subset([s in kept for s in prompts.sample_id])
        if not len(prompts):
            raise QTuneError(f"every prompt's group earned one reward in the zero-variance pre-pass "
                             f"({report['dropped']} dropped): nothing to learn from; train without "
                             "--filter-zero-variance or change the rewards")
    heldout = None
    if cfg.eval_data:
        heldout = load_records(cfg.eval_data, "auto", limit=cfg.eval_limit)[0]
    trainer = QTuneGRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=Dataset.from_dict(prompts.columns()),
        processing_class=tokenizer,
        heldout=heldout,
        eval_config=EvalConfig(max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size),
        eval_steps=cfg.eval_steps,
        step_log=out / STEP_LOG,
        keep_checkpoints=cfg.save_total_limit,
        sft_mix=sft_mix,
        demonstrations=experts,
    )
    trainer.remove_callback(PrinterCallback)  # a line per step: the step log and RewardProgress show them
    if main and cfg.progress:
        trainer.add_callback(RewardProgress())
    if main:
        prompts_per_step = args.generation_batch_size // cfg.num_generations
        log(f"GRPO from {cfg.model}{' (LoRA adapter)' if adapter else ''} on {len(prompts)} prompts: {cfg.max_steps} "
            f"steps of {prompts_per_step} prompts x {cfg.num_generations} completions ({args.device}"
            f"{f' x {args.world_size} processes' if args.world_size > 1 else ''})")
        if sft_mix.active:
            methods = ([f"CHORD, sft_weight {cfg.sft_weight:g} ({cfg.sft_weight_schedule}), token weight "
                        f"{cfg.sft_token_weight}"] if sft_mix.weight > 0 else [])
            methods += ([f"ReLIFT, an SFT step per {cfg.interleave_sft_batch} all-wrong prompts "
                         f"({cfg.interleave_sft_reward} <= 0)"] if sft_mix.interleave else [])
            log(f"SFT inside RL on {len(experts)} expert demonstrations: {'; '.join(methods)}")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final = save_trained_model(trainer.accelerator, trainer.model_wrapped, tokenizer, out / "model",
                               merge_lora=cfg.merge_lora)

    summary = summarize_rl(read_step_log(out / STEP_LOG), report)
    summary.update({
        "config": asdict(cfg),
        "start": cfg.model,
        "adapter": adapter,
        "prompts": len(prompts),
        "model_dir": str(final),
        "process_seconds": time.perf_counter() - started,
        "engine": trainer.engine,
        "processes": args.world_size,
        "machine": machine_stamp(args.device, args.world_size),
    })
    if main:
        write_json(out / "summary.json", summary)
        reward = (f", reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}"
                  if summary["reward_first"] is not None else "")
        heldout_text = (f", held-out exact match {100 * summary[HELDOUT]:.1f}%" if summary[HELDOUT] is not None
                        else "")
        log(f"{summary['steps']} steps in {summary['rl_seconds']:.1f} s{reward}{heldout_text}; model saved to {final}")
    return summary


def summarize_rl(rows: list[dict], zero_variance: dict | None) -> dict:
    """A run's totals from its step log: steps, seconds (the steps' own, plus the zero-variance
    pre-pass's), completion tokens (the tokens that received the policy loss), the tokens read
    (prompts and completions, TRL's num_tokens), the mean reward of the first and last step, the
    zero-variance groups met in training, the interleaved SFT steps and the records they trained on
    (`interleave_sft`), and the last held-out accuracy. (With num_iterations > 1 only the steps
    that generate log rewards and tokens.)"""
    heldout = [r[HELDOUT] for r in rows if HELDOUT in r]
    rewards = [r["reward"] for r in rows if "reward" in r]
    seen = [r["num_tokens"] for r in rows if "num_tokens" in r]
    filter_seconds = zero_variance["seconds"] if zero_variance else 0.0
    rl_seconds = sum(r["seconds"] for r in rows)
    return {
        "steps": len(rows),
        "rl_seconds": rl_seconds,
        "filter_seconds": filter_seconds,
        "wall_seconds": rl_seconds + filter_seconds,
        "completion_tokens": sum(r.get("completion_tokens", 0) for r in rows),
        "tokens_seen": int(seen[-1]) if seen else 0,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "zero_variance_groups": sum(r.get("zero_variance_groups", 0) for r in rows),
        "interleaved_sft_steps": sum("interleaved_sft_records" in r for r in rows),
        "interleaved_sft_records": sum(r.get("interleaved_sft_records", 0) for r in rows),
        HELDOUT: heldout[-1] if heldout else None,
        "zero_variance": None if zero_variance is None else {k: v for k, v in zero_variance.items() if k != "groups"},
    }
