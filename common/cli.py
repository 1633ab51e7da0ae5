"""What the three CLIs share: the user-error boundary and the config option."""
from __future__ import annotations

import functools
import sys

import click

from common.errors import CapError

CONFIG_HELP = "TOML config shared by cap-prep, cap-train and cap-export (keys: README.md, 'Config reference')."


def user_errors(prog: str):
    """Decorator for a click command body: a CapError becomes one line on stderr and exit code 2."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except CapError as e:
                click.echo(f"{prog}: error: {e}", err=True)
                sys.exit(e.exit_code)
            except KeyboardInterrupt:
                click.echo(f"{prog}: interrupted", err=True)
                sys.exit(130)
        return run
    return wrap
