"""Options of `qtune rl` (`RLConfig`): one dataclass for the flags, YAML files and Python, built
with `qtune.config`'s helpers, so a bad value stops the command with one line before anything
loads. GRPO's own options keep TRL's names and defaults (`GRPOConfig`) where qtune has no name of
its own for them (`lr`, `batch_size`, `grad_accum` are `qtune train`'s names)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import EngineConfig, ModelConfig, check_lr_scheduler, option
from ..errors import OptionError, QTuneError
from ..rewards import parse_spec
from .sft_mix import SCHEDULES, TOKEN_WEIGHTS

#: TRL's loss aggregations (GRPOConfig.loss_type) that qtune passes on; docs/rl.md says what each does.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")


def _rewards(value: tuple[str, ...]) -> str | None:
    """Each entry a registered reward or module:function, with an optional finite =WEIGHT."""
    from ..rewards import REWARDS, parse_spec, resolve

    allowed = (f"one or more rewards, each a registered one ({', '.join(sorted(REWARDS))}) or module:function, "
               "optionally with =WEIGHT")
    if not value:
        return allowed
    for spec in value:
        try:
            name, weight = parse_spec(spec)
            resolve(name)
        except ValueError:
            return f"{allowed} (the weight of {spec!r} is not a number)"
        except QTuneError as exc:
            return f"{allowed} ({exc})"
        if not math.isfinite(weight):
            return f"{allowed} (the weight of {spec!r} is not finite)"
    return None


@dataclass
class PromptDataConfig(ModelConfig):
    """The start model and the prompts: records whose last turn is a reference answer with a `#### N` line."""

    model: str = option(help="The start: an SFT output, full weights or a LoRA adapter folder (adapter_config.json; "
                             "its base model is loaded from the path the adapter names), a qtune train output "
                             "folder (its model/), or any model qtune train's --model takes (a known name such as "
                             "smollm2-135m-instruct, a .gguf file).", required=True)
    data: str = option(help="Prompts with checkable answers: any format qtune reads (GSM8K question/answer, messages, "
                            "...); the last assistant turn is the reference, whose `#### N` is the answer.",
                       required=True)
    format: str = option("auto", "Record format; auto detects it from the first record.",
                         choices=["auto", "alpaca", "prompt_completion", "question_answer", "messages", "sharegpt"])
    skip_invalid: bool = option(False, "Skip malformed records and records whose reference has no `#### N` line "
                                       "(and report them) instead of stopping.")
    limit: int | None = option(None, "Use only the first N records.", bounds="[1, inf)")


@dataclass
class GRPOOptions(PromptDataConfig):
    """GRPO (TRL's GRPOTrainer): group size, rewards, KL, clipping, optimisation and generation."""

    rewards: tuple[str, ...] = option(("exact_match", "answer_format"),
                                      "Reward functions, summed with their weights: a registered name (exact_match, "
                                      "answer_format, length_penalty) or module:function, each optionally =WEIGHT "
                                      "(length_penalty=0.1).", check=_rewards)
    num_generations: int = option(8, "Completions sampled per prompt (the group size G); advantages are rewards "
                                      "relative to their group.", bounds="[2, inf)")
    batch_size: int = option(32, "Completions per micro-batch per process (TRL's per_device_train_batch_size); "
                                 "prompts per optimizer step = batch_size x grad_accum x processes / "
                                 "num_generations, which must be whole.", bounds="[1, inf)")
    grad_accum: int = option(1, "Micro-batches per optimizer step (one generation round per step).",
                             bounds="[1, inf)")
    max_steps: int = option(100, "Optimizer steps of the RL stage.", bounds="[1, inf)")
    lr: float = option(1e-6, "Peak learning rate (TRL's default 1e-6 suits billion-parameter models; the testbed's "
                             "tiny model wants far more, see docs/rl.md).", bounds="(0, inf)")
    lr_scheduler: str = option("linear", "Learning-rate schedule (any transformers scheduler name).",
                               check=check_lr_scheduler)
    warmup_ratio: float = option(0.0, "Fraction of the steps used for linear warm-up.", bounds="[0, 1)")
    weight_decay: float = option(0.0, "AdamW weight decay.", bounds="[0, inf)")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).", bounds="[0, inf)")
    beta: float = option(0.0, "KL coefficient: weight of the KL divergence to the start model (0: no reference "
                              "model is kept, as TRL's default; DeepSeek-R1 used 0.001).", bounds="[0, inf)")
    epsilon: float = option(0.2, "Clipping: the policy ratio is clipped to [1 - epsilon, 1 + epsilon_high].",
                            bounds="(0, inf)")
    epsilon_high: float | None = option(None, "Upper clipping bound (default: epsilon; DAPO uses 0.28).",
                                        bounds="(0, inf)")
    num_iterations: int = option(1, "Optimisation passes over each generation batch (mu of the GRPO paper).",
                                 bounds="[1, inf)")
    loss_type: str = option("dapo", "How token losses are averaged (TRL's loss_type): grpo (per sequence, then over "
                                    "sequences), dr_grpo (a constant), dapo (the step's active tokens), bnpo (the "
                                    "micro-batch's active tokens), cispo, sapo.", choices=LOSS_TYPES)
    scale_rewards: str = option("group", "Advantage = reward - group mean, divided by the group's standard "
                                         "deviation (group), the batch's (batch) or nothing (none; Dr. GRPO).",
                                choices=["group", "batch", "none"])
    temperature: float = option(1.0, "Sampling temperature of the completions.", bounds="(0, inf)")
    top_p: float = option(1.0, "Nucleus sampling: the smallest set of tokens with this probability mass.",
                          bounds="(0, 1]")
    max_completion_length: int = option(256, "Most tokens generated per completion (a longer one is cut).",
                                         bounds="[1, inf)")
    mask_truncated_completions: bool = option(False, "Leave completions cut at max_completion_length out of the "
                                                     "loss (DAPO).")
    seed: int = option(0, "Seed of the prompt order, the sampling and the zero-variance pre-pass.",
                       bounds="[0, 4294967295]")


@dataclass
class RLConfig(GRPOOptions, EngineConfig):
    """Options of `qtune rl` (`qtune.rl.run_rl`)."""

    out: str = option(help="Output folder: checkpoints, steps.jsonl, the final model in OUT/model, summary.json.",
                      required=True)
    filter_zero_variance: bool = option(False, "Before training, sample num_generations completions per prompt "
                                               "with the start model and drop the prompts whose rewards all agree "
                                               "(all right or all wrong: no learning signal); the count and the "
                                               "pass's time go to OUT/zero_variance.json and summary.json.")
    sft_weight: float = option(0.0, "CHORD (arXiv 2508.11408): the SFT share mu of the loss, (1 - mu) GRPO + mu SFT "
                                    "on expert demonstrations (the records' reference answers, batch_size / "
                                    "num_generations of them per micro-batch, drawn in a seeded order); 0: no SFT "
                                    "term. With sft_weight_schedule decay, mu's peak (CHORD-mu: 0.9; CHORD-phi: 0.1, "
                                    "constant).", bounds="[0, 1]")
    sft_weight_schedule: str = option("constant", "How mu moves: constant (sft_weight throughout) or decay (from "
                                                  "sft_weight to sft_weight_floor by a half cosine over "
                                                  "sft_weight_decay_steps, then the floor).", choices=SCHEDULES)
    sft_weight_floor: float = option(0.05, "The decay schedule's final mu (CHORD-mu: 0.05).",
                                     bounds="[0, 1]")
    sft_weight_decay_steps: int | None = option(None, "Optimizer steps over which mu decays (default: max_steps; "
                                                      "CHORD-mu: 200).", bounds="[1, inf)")
    sft_token_weight: str = option("none", "Weight of each expert token's NLL: none (1), or p(1-p) with p the "
                                           "current policy's probability of the token, held constant in the gradient "
                                           "(CHORD-phi).", choices=TOKEN_WEIGHTS)
    sft_max_length: int = option(1024, "Most tokens of an expert demonstration (prompt and reference answer, "
                                       "rendered as qtune train renders them); a longer one loses its end.",
                                 bounds="[2, inf)")
    interleave_sft: bool = option(False, "ReLIFT (arXiv 2506.07527): collect the prompts whose every completion is "
                                         "wrong (interleave_sft_reward <= 0 throughout the group), buffer their "
                                         "reference answers, and when the buffer holds interleave_sft_batch records "
                                         "take one extra optimizer step on their NLL, then empty the buffer.")
    interleave_sft_batch: int = option(64, "Buffered records that trigger an interleaved SFT step (the "
                                           "authors' released setting: 64).", bounds="[1, inf)")
    interleave_sft_reward: str = option("exact_match", "The reward (as named in rewards, without its weight) whose "
                                                       "value <= 0 marks a wrong completion for interleave_sft.")
    eval_data: str | None = option(None, "Held-out problems: greedy exact match (qtune eval's strict extractor) "
                                         "every eval_steps steps and after the last step.")
    eval_steps: int = option(0, "Evaluate on eval_data every N steps (0: after the last step only).",
                             bounds="[0, inf)")
    eval_limit: int | None = option(None, "Evaluate on the first N records of eval_data.", bounds="[1, inf)")
    eval_max_new_tokens: int = option(256, "Most tokens generated per held-out problem.", bounds="[1, inf)")
    eval_batch_size: int = option(16, "Held-out prompts generated at once.", bounds="[1, inf)")
    merge_lora: bool = option(False, "With a LoRA start: merge the trained adapter into the base weights when "
                                     "saving OUT/model (default: save the adapter).")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass (less memory).")
    use_vllm: bool = option(False, "Generate the completions with vLLM, as TRL does (pip install 'trl[vllm]'; GPU).")
    vllm_mode: str = option("colocate", "vLLM in the training processes (colocate) or a separate `trl vllm-serve` "
                                        "server (server).", choices=["colocate", "server"])
    vllm_server_base_url: str | None = option(None, "vllm_mode server: the server's URL (default "
                                                    "http://0.0.0.0:8000).")
    save_steps: int = option(50, "Save a checkpoint every N steps.", bounds="[1, inf)")
    save_total_limit: int = option(2, "Checkpoints kept on disk (oldest deleted first).", bounds="[1, inf)")
    report_to: str = option("none", "Where transformers reports the per-step metrics: none, tensorboard, wandb, ...")
    resume: bool = option(False, "Resume from the last complete checkpoint in --out.")
    allow_config_change: str | None = option(None, "With --resume: comma-separated options that may differ from the "
                                                   "run's recorded ones (max_steps, dtype, device, max_grad_norm, "
                                                   "merge_lora).")
    progress: bool = option(True, "Show a progress bar with the reward's mean and spread.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_steps > 0 and self.eval_data is None:
            raise OptionError("eval_data", None, "a file of held-out problems when eval_steps is above 0")
        shaped = [name for name, unset in (("sft_weight_schedule", "constant"), ("sft_token_weight", "none"),
                                           ("sft_weight_decay_steps", None)) if getattr(self, name) != unset]
        if self.sft_weight == 0 and shaped:
            raise OptionError("sft_weight", self.sft_weight, f"above 0 when {' and '.join(shaped)} is set (they "
                                                             "shape the SFT term that sft_weight weights)")
        if self.sft_weight_schedule == "decay" and self.sft_weight_floor > self.sft_weight:
            raise OptionError("sft_weight_floor", self.sft_weight_floor,
                              f"at most sft_weight ({self.sft_weight:g}) with the decay schedule")
        if self.interleave_sft:
            names = [parse_spec(spec)[0] for spec in self.rewards]
            if self.interleave_sft_reward not in names:
                raise OptionError("interleave_sft_reward", self.interleave_sft_reward,
                                  f"one of the run's rewards ({', '.join(names)}) with interleave_sft: the one whose "
                                  "value <= 0 marks a wrong completion")
            if self.deepspeed or self.fsdp:
                raise OptionError("interleave_sft", True, "off under DeepSpeed or FSDP (its extra optimizer step is "
                                                          "taken outside the Trainer's step, which DeepSpeed owns; "
                                                          "tested in one process and under DDP)")


__all__ = ["LOSS_TYPES", "GRPOOptions", "PromptDataConfig", "RLConfig"]
