"""cap-train CONFIG: launch DeepSpeed pipeline training (see README, 'cap-train')."""
from __future__ import annotations

import click

from common.cli import CONFIG_HELP, user_errors
from common.config import load_config
from common.errors import CapError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--num-gpus", type=click.IntRange(min=1), default=None,
              help="Processes on this node (GPUs; on CPU, gloo processes sharing the cores). Default: all GPUs, or 1.")
@click.option("--master-addr", default=None, help="Address of the rank-0 node for multi-node runs.")
@click.option("--master-port", type=int, default=None, help="Port of the rank-0 process (default 29500).")
@click.option("--hostfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="DeepSpeed hostfile for multi-node training (ssh between nodes).")
@click.option("--resume-from-checkpoint", is_flag=True, help="Continue from the newest complete checkpoint in output_dir.")
@click.option("--add-prefix-space", is_flag=True, help="Tokenize with add_prefix_space (when cap-prep runs from here).")
@user_errors("cap-train")
def main(config, num_gpus, master_addr, master_port, hostfile, resume_from_checkpoint, add_prefix_space):
    """Train the adapters (or full model) that CONFIG describes.

    CONFIG is the TOML file shared with cap-prep and cap-export; every key is listed in the
    README's config reference. The prepared dataset is reused from prepared_dir, or built first.
    """
    cfg = load_config(config, {"add_prefix_space": True} if add_prefix_space else None)
    cfg.check_world_size(num_gpus or 1)
    raise CapError("training is not available in this build yet (tracked by the cap-train issue)")
