"""What the three CLIs share: the user-error boundary, the config option, and the answers to qlora-pipe-lite's flags."""

from __future__ import annotations

import functools
import shlex
import signal
import sys
from typing import Callable

import click

from cap_common.errors import CapError
from cap_common.files import os_error_message

CONFIG_HELP = "TOML config shared by cap-prep, cap-train and cap-export (keys: README.md, 'Config reference')."


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C does, so every `finally` / cleanup of temporary outputs runs."""
    raise SystemExit(128 + signum)


def user_errors(prog: str):
    """Decorator for a click command body: a CapError (or an OSError that escaped the code that
    knows the path, e.g. a full disk) becomes one line on stderr and exit code 2; SIGTERM and
    Ctrl-C unwind through the cleanup code and exit with 143 / 130."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            signal.signal(signal.SIGTERM, _terminate)
            try:
                return fn(*args, **kwargs)
            except CapError as e:
                click.echo(f"{prog}: error: {e}", err=True)
                sys.exit(e.exit_code)
            except OSError as e:
                click.echo(f"{prog}: error: {os_error_message(e)}", err=True)
                sys.exit(CapError.exit_code)
            except KeyboardInterrupt:
                click.echo(f"{prog}: interrupted", err=True)
                sys.exit(130)

        return run

    return wrap


def _no_remote_code() -> str:
    from cap_common.models.families import FAMILIES  # not at import: cap_common.models imports torch

    return (
        "note: --trust-remote-code has no effect: cap never runs a model's own code; it builds the decoder from "
        f"transformers' classes for {', '.join(FAMILIES)}"
    )


REMOTE_CODE = {"--trust-remote-code": _no_remote_code, "--trust_remote_code": _no_remote_code}


class OneLineUsage(click.UsageError):
    """`<prog>: error: …`, exit code 2, without click's usage block."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog

    def show(self, file=None) -> None:
        click.echo(f"{self.prog}: error: {self.format_message()}", err=True)


class PeerFlags(click.Command):
    """A command that answers qlora-pipe-lite's command-line habits before click parses, in one line:
    `--config X` (CONFIG is positional: the command line to type), a cap option spelled with underscores, and
    the flags of `peer_flags` ({flag: answer or a function giving it}): an error (exit 2), or, for an answer
    starting with "note: ", that note on stderr and the flag dropped (it has no effect in cap)."""

    def __init__(self, *args, prog: str, peer_flags: dict[str, str | Callable[[], str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.prog, self.peer_flags = prog, peer_flags or {}

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, args if ctx.resilient_parsing else self._answer(args))

    def _answer(self, args: list[str]) -> list[str]:
        own = {opt for p in self.params for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        kept, i = [], 0
        while i < len(args) and args[i] != "--":
            flag, eq, value = args[i].partition("=")
            if flag == "--config":
                value = value if eq else (args[i + 1] if i + 1 < len(args) else "CONFIG")
                rest = args[i + (1 if eq else 2) :]
                raise OneLineUsage(self.prog, f"CONFIG is positional: {shlex.join([self.prog, value, *kept, *rest])}")
            if flag in self.peer_flags:
                answer = self.peer_flags[flag]
                answer = answer() if callable(answer) else answer
                if not answer.startswith("note: "):
                    raise OneLineUsage(self.prog, f"{flag}: {answer}")
                click.echo(answer, err=True)
            elif flag.startswith("--") and "_" in flag and flag.replace("_", "-") in own:
                raise OneLineUsage(self.prog, f"{flag}: {self.prog}'s spelling is {flag.replace('_', '-')}")
            else:
                kept.append(args[i])
            i += 1
        return kept + args[i:]
