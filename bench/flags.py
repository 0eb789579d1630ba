"""Error messages in the user's terms: the config field a message names, told as the flag the user typed.

The configs validate themselves and say `batch_size=0; accepted: ...`; the user typed `--batch 0`.
`name_flags` puts the flags of the fields a message names in front of it, using the options the
command really has, so every CLI translates in this one place instead of checking twice.
"""

from __future__ import annotations

import argparse
import re

# field -> the flags that set it, first match among the command's options wins; a field not
# listed is its own flag (checkpoint_every -> --checkpoint-every) when the command has that option.
FIELD_FLAGS = {
    "batch_size": ("--batch",),
    "replay_batch": ("--replay-batch", "--batch"),  # edgecl run: the replay batch is the stream batch (LearnerSpec)
    "seed": ("--seed", "--seeds"),
    "tdm": ("--no-tdm",),
    "dgm": ("--no-dgm",),
    "ddr": ("--no-ddr",),
    "weight_sparsity": ("--sparsity",),
    "examples_per_epoch": ("--examples",),
    "baudrate": ("--baud",),
    "reply_timeout": ("--timeout",),
    "num_classes": ("--classes",),
    "cache_dir": ("--cache",),
    "round_timeout_s": ("--round-timeout",),
    "masked_aggregation": ("--no-masked-aggregation",),
}
_FIELD = re.compile(r"(?<![\w.\-])([a-z][a-z0-9_]*)=")


def command_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[str]:
    """The option strings of the (sub)command `args` was parsed for, down the chosen subcommands."""
    options: set[str] = set()
    while parser is not None:
        options |= {s for action in parser._actions for s in action.option_strings}
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        parser = sub.choices.get(getattr(args, sub.dest, None)) if sub is not None else None
    return options


def name_flags(message: str, options: set[str]) -> str:
    """`message` with the flags of the fields it names in front: "--batch: batch_size=0; accepted: ..."."""
    flags = []
    for field in _FIELD.findall(message):
        candidates = FIELD_FLAGS.get(field, ("--" + field.replace("_", "-"),))
        flag = next((c for c in candidates if c in options), None)
        if flag is not None and flag not in flags and flag not in message:
            flags.append(flag)
    return f"{', '.join(flags)}: {message}" if flags else message
