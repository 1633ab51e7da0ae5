"""qlora-pipe-lite's command lines typed at cap-export: one line with cap's form of the same command.

Its tools (docs: the qlora-pipe-lite spec, section 11) and what they become:

  control_adapter_to_lora.py --base B --adapter A --output O [--inverse]   cap-export additive B A O [--inverse]
  control_adapter_to_additive_lora.py BASE CA OUT [--rank k]  (Aug 2025)    cap-export additive BASE CA OUT [--rank k]
  control_adapter_to_multiplicative_lora.py CA OUT  (Aug 2025)              cap-export multiplicative CA OUT
  merge_lora.py --input BASE --adapter LORA --output OUT [--scale x]        cap-export merge BASE LORA OUT [--scale x]
  lora_to_gguf.py --input LORA --output F.gguf [--arch A] [--outtype T]     cap-export gguf LORA F.gguf --base BASE
  analyze_control_adapters.py --adapter DIR                                 cap-export inspect DIR
  convert_ds_checkpoint.py --input CKPT --config TOML --output DIR          cap-export additive BASE RUN/epochN DIR
                    (cap cannot read DeepSpeed's CKPT = RUN/global_stepN; it reads RUN's epoch<N>/ adapters as they are)

Their flags typed after a cap command (`--input`, `--adapter`, `--output`, `--no-gpu`, `--arch`,
`--base` where the command has no such option, …) get the same one-line answer, exit code 2.
Flags a cap command defines are never intercepted. No torch import here: `--help` stays fast.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from cap_export import PROG

# qlora-pipe-lite tool (file name without .py) → the cap-export command doing the same job.
SCRIPTS = {
    "control_adapter_to_lora": "additive",
    "control_adapter_to_additive_lora": "additive",
    "control_adapter_to_multiplicative_lora": "multiplicative",
    "merge_lora": "merge",
    "lora_to_gguf": "gguf",
    "analyze_control_adapters": "inspect",
    "convert_ds_checkpoint": None,
}

# cap command → its positional arguments, each with the qlora-pipe-lite flags that name it.
SLOTS = {
    "additive": [("BASE", ("--base", "--input")), ("CKPT", ("--adapter",)), ("OUT", ("--output",))],
    "multiplicative": [("CKPT", ("--adapter", "--input")), ("OUT", ("--output",))],
    "merge": [("BASE", ("--input", "--base")), ("LORA", ("--adapter",)), ("OUT", ("--output",))],
    "gguf": [("LORA", ("--input", "--adapter")), ("OUT", ("--output",))],
    "verify": [("BASE", ("--base", "--input")), ("ADAPTER", ("--adapter",)), ("EXPORTED", ("--output",))],
    "inspect": [("ADAPTER", ("--adapter", "--input"))],
}
OPTIONAL_SLOTS = {"EXPORTED"}

VALUE_FLAGS = {"--input", "--adapter", "--output", "--base", "--arch", "--config", "--mixtral", "--rank", "--scale"}
VALUE_FLAGS |= {"--outtype"}
SWITCHES = {"--no-gpu", "--cohere", "--inverse", "--multiplicative"}

WHY = {
    "--no-gpu": "cap-export runs on the CPU",
    "--arch": "the architecture comes from BASE/config.json",
    "--cohere": "the family comes from BASE/config.json",
    "--mixtral": "the family comes from BASE/config.json",
}
COMPAT = ("--cohere", "--mixtral")  # accepted by cap's converters and merge (ignored), left out of cap's form


class PeerUsage(click.ClickException):
    """One line `cap-export: error: …`, exit code 2 (click's UsageError would add a usage block)."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"{PROG}: error: {self.format_message()}", err=True)


class PeerGroup(click.Group):
    """The cap-export group: before click parses, a qlora-pipe-lite command line gets cap's form."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:
            message = peer_hint(args, self.commands)
            if message:
                raise PeerUsage(message)
        return super().parse_args(ctx, args)


def epoch_folder(checkpoint: str | Path) -> Path:
    """For qlora-pipe-lite's DeepSpeed checkpoint RUN/global_stepN, which cap cannot read: the newest epoch<N>/
    folder it saved in RUN, which cap reads as it is (RUN/epochN when there is none)."""
    run = Path(checkpoint).parent
    epochs = [p for p in run.glob("epoch*") if p.name[5:].isdigit()]
    return max(epochs, key=lambda p: int(p.name[5:])) if epochs else run / "epochN"


def checkpoint_form(checkpoint: str | Path, base: str = "BASE", out: str = "OUT") -> str:
    """cap-export's command for the Control Adapter of that checkpoint's run (`epoch_folder`)."""
    return shlex.join([PROG, "additive", base, str(epoch_folder(checkpoint)), out])


def _script(token: str) -> str | None:
    """'tools/merge_lora.py' / 'merge-lora' → 'merge_lora' when that is a qlora-pipe-lite tool."""
    name = token.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".py").replace("-", "_")
    return name if name in SCRIPTS else None


def _takes_value(command: click.Command, flag: str) -> bool | None:
    """Whether the command's own option `flag` takes a value; None when it has no such option."""
    for param in command.params:
        if isinstance(param, click.Option) and flag in param.opts + param.secondary_opts:
            return not (param.is_flag or param.count)
    return None


def peer_hint(args: list[str], commands: dict[str, click.Command]) -> str | None:
    """The one-line answer to a qlora-pipe-lite command line, or None when `args` is not one."""
    args = args[: args.index("--")] if "--" in args else list(args)
    first = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if first is None:
        return None
    name, rest = args[first], args[first + 1 :]
    script = _script(name)
    if script is None and name not in commands:
        return None
    command = SCRIPTS[script] if script else name
    cap_command = commands.get(command) if command else None

    peer: dict[str, str | None] = {}  # qlora-pipe-lite flag → its value (None for a switch)
    compat: dict[str, str | None] = {}  # --cohere / --mixtral N where the cap command accepts them
    options: list[str] = []  # the cap command's own options, kept as typed
    positionals: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        flag, eq, inline = token.partition("=")
        own = _takes_value(cap_command, flag) if cap_command is not None and token.startswith("-") else None
        if token.startswith("--") and (own is None or flag in COMPAT) and flag in VALUE_FLAGS | SWITCHES:
            found = peer if own is None else compat
            if flag in SWITCHES:
                found[flag] = None
            elif eq:
                found[flag] = inline
            else:
                found[flag] = rest[i + 1] if i + 1 < len(rest) else None
                i += 1
        elif token.startswith("-"):
            options.append(token)
            if own and not eq and i + 1 < len(rest):
                options.append(rest[i + 1])
                i += 1
        else:
            positionals.append(token)
        i += 1
    if script is None and not peer:
        return None
    what = (
        f"'{name}' is a qlora-pipe-lite tool"
        if script
        else f"{', '.join(peer)} {'is a qlora-pipe-lite option' if len(peer) == 1 else 'are qlora-pipe-lite options'}"
    )
    why = [WHY[flag] for flag in peer if flag in WHY]
    if command == "multiplicative" and "--rank" in peer:
        why.append("the multiplicative LoRA is lossless at the adapter's rank")
    if command is None:  # convert_ds_checkpoint
        form = checkpoint_form(peer.get("--input") or "RUN/global_stepN", out=peer.get("--output") or "OUT")
        return (
            f"{what}; cap cannot read its DeepSpeed checkpoint, and reads the epoch<N>/ folder qlora-pipe-lite saves "
            f"next to it (adapter_model.bin + adapter_config.json) as it is: `{form}` (a mid-epoch checkpoint: "
            f"convert it with its tool first, and pass the tool's output folder instead of the epoch folder)"
        )
    if cap_command is None:
        return f"{what}; cap-export has no '{command}' command here (see `{PROG} --help`)"

    words = [PROG, command]
    for slot, flags in SLOTS.get(command, []):
        value = next((peer[f] for f in flags if peer.get(f)), None)
        if value is None and positionals:
            value = positionals.pop(0)
        if value is not None or slot not in OPTIONAL_SLOTS:
            words.append(value or slot)
    words += positionals + options
    extra = ""
    if command == "multiplicative" and compat.get("--mixtral") and "--base" not in options:
        words += ["--mixtral", compat["--mixtral"]]  # without a base model it names the experts
    if command == "gguf" and "--base" not in options:
        words += ["--base", "BASE"]
    if command == "merge" and "--inverse" in peer:
        if "--multiplicative" in options:
            extra = (
                f"; for (I + ΔW)⁻¹·W export the inverse from the Control Adapter instead: "
                f"`{PROG} multiplicative CKPT OUT --exact-inverse`, then merge that"
            )
        else:
            words += ["--scale", "-1"]
            why.append("W − ΔW is --scale -1")
    why_text = f" ({'; '.join(why)})" if why else ""
    return f"{what}{why_text}; cap's form: `{shlex.join(words)}`{extra}"
