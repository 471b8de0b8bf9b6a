"""`qtune rl`: reinforcement learning with verifiable rewards (GRPO, TRL's `GRPOTrainer`) from any
SFT output, full weights or a LoRA adapter. See docs/rl.md.

- `config`: `RLConfig`, the command's options (flags, YAML keys, Python);
- `prompts`: the prompts and their checkable answers, the start model;
- `zero_variance`: the pre-pass that drops prompts whose group rewards all agree;
- `sft_mix`: the maths of SFT inside RL (CHORD's mixed loss, ReLIFT's all-wrong groups);
- `trainer`: `QTuneGRPOTrainer`, TRL's trainer with complete checkpoints, a step log, held-out
  accuracy and a reward progress bar;
- `run`: `run_rl`, the command.

`RLConfig` is importable without TRL or a model; `run_rl` and `QTuneGRPOTrainer` load TRL when
first used (`from qtune.rl import run_rl`).
"""

from .config import RLConfig

__all__ = ["QTuneGRPOTrainer", "RLConfig", "run_rl"]


def __getattr__(name: str):
    if name == "run_rl":
        from .run import run_rl

        return run_rl
    if name == "QTuneGRPOTrainer":
        from .trainer import QTuneGRPOTrainer

        return QTuneGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
