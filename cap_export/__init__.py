"""cap-export: turn trained adapters into PEFT LoRA, merged models and GGUF."""

import click

PROG = "cap-export"


def note(message: str) -> None:
    """One `cap-export: note: …` line on stderr."""
    click.echo(f"{PROG}: note: {message}", err=True)
