"""What the three CLIs share: the user-error boundary and the config option."""

from __future__ import annotations

import functools
import signal
import sys

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
