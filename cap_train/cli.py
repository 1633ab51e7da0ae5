"""cap-train CONFIG: validate, then launch the workers through DeepSpeed's launcher.

Every process runs `python -m cap_train.worker CONFIG`. On CUDA the launcher starts one process
per GPU (NCCL); without GPUs `--num-gpus N` starts N gloo processes that share the cores
(OMP_NUM_THREADS = cores / N each). Multi-node runs use a DeepSpeed hostfile (ssh), as DeepSpeed
documents; --master-addr names the rank-0 node.
"""
from __future__ import annotations

import os
import subprocess
import sys

import click

from common.cli import user_errors
from common.config import load_config
from common.errors import CapError


def _gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launcher_command(config: str, num_procs: int, *, master_addr=None, master_port=None, hostfile=None,
                     resume=False, add_prefix_space=False) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    else:
        cmd += ["--num_gpus", str(num_procs)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    cmd += ["--master_port", str(master_port or 29500)]
    cmd += ["--module", "cap_train.worker", config]
    if resume:
        cmd.append("--resume-from-checkpoint")
    if add_prefix_space:
        cmd.append("--add-prefix-space")
    return cmd


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
    Writes <output_dir>/tensorboard/, checkpoints/ and epoch<N>/ (adapter_model.safetensors +
    adapter_config.json).
    """
    cfg = load_config(config, {"add_prefix_space": True} if add_prefix_space else None)
    gpus = _gpus()
    procs = num_gpus or max(gpus, 1)
    if not hostfile:
        if gpus and procs > gpus:
            raise CapError(f"--num-gpus {procs}: this node has only {gpus} GPU(s)")
        cfg.check_world_size(procs)
    env = dict(os.environ)
    if not gpus:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs))
    cmd = launcher_command(str(cfg.source), procs, master_addr=master_addr, master_port=master_port,
                           hostfile=hostfile, resume=resume_from_checkpoint, add_prefix_space=add_prefix_space)
    rc = subprocess.call(cmd, env=env)
    if rc:
        click.echo(f"cap-train: a worker failed (exit code {rc}); see its message above", err=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
