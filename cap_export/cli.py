"""cap-export: convert, merge, verify and GGUF-export trained adapters (see README, 'cap-export')."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Turn a trained adapter (an epoch<N>/ folder or a training checkpoint) into files that PEFT,
    transformers and llama.cpp load.

    \b
    multiplicative CKPT OUT            lossless multiplicative LoRA on the residual writers
    additive BASE CKPT OUT             standard PEFT LoRA (exact at the adapter's rank)
    merge BASE LORA OUT                full model folder with the LoRA merged in
    gguf LORA OUT --base BASE          GGUF LoRA adapter for llama.cpp
    verify BASE ADAPTER                max |Δlogit| and KL between trained and exported forms

    Run `cap-export COMMAND --help` for each; the README's 'cap-export' section explains the math.
    """
