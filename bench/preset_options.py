"""Print a testbed preset's calibrated settings (`PRESETS[name].sft_settings`) as the flags of one
command, for the scripts of bench/ that run `qtune train`, `qtune eval` or bench/saturated_a1.py
beside `qtune bench --testbed` (which takes the same settings from the preset itself), so that no
script repeats them and none disagrees with the preset when it changes.

    python bench/preset_options.py PRESET train|eval|a1

train: --epochs, --lr, --batch-size and --warmup-ratio of `qtune train`; eval: --max-new-tokens
and --batch-size (the preset's evaluation batch) of `qtune eval`; a1: --epochs, --lr and
--batch-size of bench/saturated_a1.py (its plain loop has a fixed 5% warm-up). A flag given after
them on the same command line overrides them (`--epochs 1`).
"""

from __future__ import annotations

import argparse

from qtune.testbed import PRESETS

#: Per command: (key of sft_settings, its flag).
FLAGS = {
    "train": (("epochs", "--epochs"), ("lr", "--lr"), ("batch_size", "--batch-size"),
              ("warmup_ratio", "--warmup-ratio")),
    "eval": (("max_new_tokens", "--max-new-tokens"), ("eval_batch_size", "--batch-size")),
    "a1": (("epochs", "--epochs"), ("lr", "--lr"), ("batch_size", "--batch-size")),
}


def preset_flags(preset: str, command: str) -> str:
    """The flags, e.g. "--epochs 3 --lr 0.0003 --batch-size 4 --warmup-ratio 0.05"."""
    settings = PRESETS[preset].sft_settings
    return " ".join(f"{flag} {settings[key]:g}" for key, flag in FLAGS[command])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("command", choices=sorted(FLAGS))
    args = parser.parse_args(argv)
    print(preset_flags(args.preset, args.command))


if __name__ == "__main__":
    main()
