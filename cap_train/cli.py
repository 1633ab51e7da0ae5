"""cap-train CONFIG: validate, choose the checkpoint to resume from, then start the workers.

Every process runs `python -m cap_train.worker CONFIG …`. On one node cap_train.launch starts
them (one per GPU with NCCL; without GPUs `--num-gpus N` gloo processes sharing the cores,
OMP_NUM_THREADS = cores / N each) and reports a failing rank in one line. Multi-node runs use a
DeepSpeed hostfile (ssh) and DeepSpeed's launcher; --master-addr names the rank-0 node. Each
rank's full output goes to <output_dir>/logs/<run>/rank<r>.log.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import click

from cap_common.cli import REMOTE_CODE, PeerFlags, user_errors
from cap_common.config import Config, load_config
from cap_common.errors import CapError
from cap_train import profile
from cap_train.devices import choose_gpus, visible_gpus
from cap_train.external import launcher_environment, run_id
from cap_train.hosts import LAUNCHERS, check_launch, hosts
from cap_train.run_lock import one_run
from cap_train.watch import resume_hint_from


def free_port() -> int:
    """A TCP port nobody listens on now, for the rank-0 rendezvous of a single-node run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_args(
    config: str, *, resume_from=None, restart_epoch=False, add_prefix_space=False, log_dir=None, accept=False
) -> list[str]:
    args = [config]
    if accept:
        args.append("--accept-config-change")
    if resume_from:
        args += ["--resume-from", str(resume_from)]
    if restart_epoch:
        args.append("--restart-epoch")
    if add_prefix_space:
        args.append("--add-prefix-space")
    if log_dir:
        args += ["--log-dir", str(log_dir)]
    return args


def deepspeed_command(
    args: list[str], hostfile: str, master_addr=None, master_port=None, include=None, exclude=None, launcher="pdsh"
) -> list[str]:
    """DeepSpeed's multi-node launcher (pdsh over ssh, MPI or srun to the hostfile's nodes) running
    cap_train.worker; --include/--exclude select hosts and GPUs in DeepSpeed's `host:0,1@host2` form."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--hostfile", hostfile]
    cmd += ["--launcher", launcher]
    if include:
        cmd += ["--include", include]
    if exclude:
        cmd += ["--exclude", exclude]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    cmd += ["--master_port", str(master_port or 29500), "--module", "cap_train.worker", *args]
    return cmd


def resume_choice(cfg: Config, processes: int | None, accept: bool) -> tuple[str | None, bool]:
    """(checkpoint to resume from or None, whether the data restarts at the epoch start): the newest
    checkpoint that verifies, checked against this config (cap_train.resume)."""
    from cap_train import resume
    from cap_train.checkpoint import Checkpoints, choose

    say = lambda line: click.echo(line, err=True)  # noqa: E731
    chosen = choose(Checkpoints(cfg.output_dir, cfg.max_checkpoints), say)
    if chosen is None:
        resume.refuse_peer_checkpoint(cfg)
        say(f"cap-train: no complete checkpoint in {cfg.output_dir / 'checkpoints'}; starting from scratch")
        return None, False
    old = chosen.state.get("run")
    if not isinstance(old, dict):
        say(f"cap-train: {chosen.path} records no config (written by an older cap); resuming without comparing")
        return str(chosen.path), False
    new = resume.run_record(cfg.to_dict(), resume.data_identity(cfg), processes, resume.model_shape(cfg.model_dir))
    plan = resume.plan(old, new, accept, str(chosen.path))
    if plan.applied:
        say(
            f"cap-train: resuming at step {chosen.state['step']} with changed settings, in effect from the next "
            f"step: {'; '.join(map(str, plan.applied))}"
        )
    if plan.accepted:
        say(
            f"cap-train: accepted (--accept-config-change): {'; '.join(map(str, plan.accepted))}"
            f"{'; the data restarts at the start of the current epoch' if plan.restart_epoch else ''}"
        )
    return str(chosen.path), plan.restart_epoch


_SEVERAL_NODES = (
    "cap-train runs on several nodes with --hostfile FILE (DeepSpeed's hostfile: one `host slots=N` line per node); "
    "--include/--exclude pick among them"
)
# qlora-pipe-lite's (and DeepSpeed's launcher's) flags, answered in one line (cap_common.cli.PeerFlags)
PEER_FLAGS = {"--num_nodes": _SEVERAL_NODES, "--num-nodes": _SEVERAL_NODES, **REMOTE_CODE}


@click.command(
    cls=PeerFlags, prog="cap-train", peer_flags=PEER_FLAGS, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--num-gpus",
    type=click.IntRange(min=1),
    default=None,
    help="Processes on this node (GPUs; on CPU, gloo processes sharing the cores). Default: every GPU "
    "CUDA_VISIBLE_DEVICES leaves (and --include/--exclude select), or 1. Not with --hostfile (its slots decide).",
)
@click.option(
    "--include",
    default=None,
    help="GPUs to use, DeepSpeed's form: localhost:0,2 on one node (names as in CUDA_VISIBLE_DEVICES, which "
    "must show them); with --hostfile, hosts and GPUs: node1:0,1@node2.",
)
@click.option("--exclude", default=None, help="GPUs (or, with --hostfile, hosts/GPUs) not to use; form as --include.")
@click.option("--master-addr", default=None, help="Address of the rank-0 node for multi-node runs.")
@click.option(
    "--master-port",
    type=int,
    default=None,
    help="Port of the rank-0 process (default: a free port on one node, 29500 with --hostfile).",
)
@click.option(
    "--hostfile",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="DeepSpeed hostfile for multi-node training (ssh between nodes).",
)
@click.option(
    "--launcher",
    type=click.Choice(list(LAUNCHERS)),
    default=None,
    help="With --hostfile: how DeepSpeed starts the other nodes' ranks (default pdsh, which needs passwordless "
    "ssh to every host; openmpi, mpich, impi, mvapich: mpirun; slurm: srun). Checked before anything starts.",
)
@click.option(
    "--resume-from-checkpoint",
    is_flag=True,
    help="Continue from the newest complete checkpoint in output_dir (checked; a damaged one is skipped).",
)
@click.option(
    "--accept-config-change",
    is_flag=True,
    help="With --resume-from-checkpoint: continue although data or model keys changed "
    "(a changed dataset restarts the current epoch).",
)
@click.option("--add-prefix-space", is_flag=True, help="Tokenize with add_prefix_space (when cap-prep runs from here).")
@click.option(
    "--plan",
    "show_plan",
    is_flag=True,
    help="Print each stage's memory (weights, adapters, optimizer, activations, loss), the pipeline bubble and "
    "tokens per step, from config.json alone; launch nothing.",
)
@click.option(
    "--gpu-memory",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --plan: GiB per GPU; marks stages that exceed it and names the fewest pipeline_stages that fit.",
)
@click.option("--json", "as_json", is_flag=True, help="With --plan: the plan as JSON.")
@user_errors("cap-train")
def main(
    config,
    num_gpus,
    include,
    exclude,
    master_addr,
    master_port,
    hostfile,
    launcher,
    resume_from_checkpoint,
    accept_config_change,
    add_prefix_space,
    show_plan,
    gpu_memory,
    as_json,
):
    """Train the adapters (or full model) that CONFIG describes.

    CONFIG is the TOML file shared with cap-prep and cap-export; every key is listed in the
    README's config reference. The prepared dataset is reused from prepared_dir, or built first.
    Writes <output_dir>/tensorboard/, checkpoints/, epoch<N>/ (adapter_model.safetensors +
    adapter_config.json) and logs/.
    """
    cfg = load_config(config, {"add_prefix_space": True} if add_prefix_space else None)
    if os.environ.get("CAP_PROFILE"):
        profile.parse(os.environ["CAP_PROFILE"])  # a bad value stops here, not after loading the model
    if show_plan:
        return print_plan(cfg, num_gpus, gpu_memory, as_json)
    if gpu_memory is not None or as_json:
        raise CapError("--gpu-memory and --json only apply with --plan")
    env = dict(os.environ)
    ranks = launcher_environment(env)
    if ranks is not None:  # torchrun or srun started this process as one rank (cap_train/external.py)
        given = [
            name
            for name, v in (
                ("--num-gpus", num_gpus),
                ("--hostfile", hostfile),
                ("--launcher", launcher),
                ("--include", include),
                ("--exclude", exclude),
                ("--master-addr", master_addr),
                ("--master-port", master_port),
            )
            if v
        ]
        if given:
            raise CapError(f"{', '.join(given)}: not with torchrun or srun, whose variables say where each rank runs")
        return run_as_rank(cfg, ranks, resume_from_checkpoint, accept_config_change, add_prefix_space)
    if launcher and not hostfile:
        raise CapError("--launcher only applies with --hostfile (one node: cap-train starts the ranks itself)")
    if hostfile:
        if num_gpus is not None:
            raise CapError(
                "--num-gpus does not apply with --hostfile: the hostfile's slots (and --include/--exclude) "
                "say how many GPUs each node runs"
            )
        launcher = launcher or "pdsh"
        check_launch(launcher, hostfile)  # before anything is written: one line naming what is missing
        env["MASTER_ADDR"] = master_addr or hosts(hostfile)[0]  # MPI ranks find the master only here
        env["MASTER_PORT"] = str(master_port or 29500)
        gpus, procs = [], None
    else:
        gpus = choose_gpus(visible_gpus(env), include, exclude, num_gpus, env.get("CUDA_VISIBLE_DEVICES"))
        procs = len(gpus) or num_gpus or 1
        cfg.check_world_size(procs)
    # one run per output_dir, held from before anything is written (cap_train/run_lock.py)
    with one_run(cfg.output_dir, lambda line: click.echo(line, err=True)):
        resume_from, restart_epoch = choose_start(cfg, procs, resume_from_checkpoint, accept_config_change)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # rank r uses entry r (LOCAL_RANK)
        elif not hostfile:
            env.setdefault("DS_ACCELERATOR", "cpu")
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))  # the user's setting wins
        env["CAP_WORKER"] = "1"  # the config's notes are said here, not again by every worker
        log_dir = cfg.output_dir / "logs" / time.strftime("%Y%m%d-%H%M%S")
        args = worker_args(
            str(cfg.source),
            resume_from=resume_from,
            restart_epoch=restart_epoch,
            accept=accept_config_change,
            add_prefix_space=add_prefix_space,
            log_dir=log_dir,
        )
        click.echo(
            f"cap-train: {procs or 'hostfile'} process(es){f' on GPU {chr(44).join(gpus)}' if gpus else ''}; "
            f"each rank's full output: "
            f"{log_dir}/rank<r>.log",
            err=True,
        )
        if hostfile:
            from cap_train.launch import forward_environment, run_hostfile

            skipped = forward_environment(env, log_dir / "deepspeed_env")
            if skipped:
                click.echo(
                    f"cap-train: not forwarded to the other nodes (quotes or $ in the value): {', '.join(skipped)}",
                    err=True,
                )
            cmd = deepspeed_command(args, hostfile, master_addr, master_port, include, exclude, launcher)
            rc = run_hostfile(cmd, env, str(log_dir), lambda: resume_hint_from(cfg.output_dir))
        else:
            from cap_train.launch import run_local

            rc = run_local(
                [sys.executable, "-u", "-m", "cap_train.worker", *args],
                procs,
                master_port or free_port(),
                env,
                str(log_dir),
                lambda: resume_hint_from(cfg.output_dir),
            )
    sys.exit(rc)


def choose_start(cfg: Config, procs: int | None, resume: bool, accept: bool) -> tuple[str | None, bool]:
    """(checkpoint to resume from, whether its epoch restarts); a fresh run must not write over an
    earlier run's checkpoints."""
    if resume:
        return resume_choice(cfg, procs, accept)
    if accept:
        raise CapError("--accept-config-change only applies with --resume-from-checkpoint")
    _refuse_to_mix_runs(cfg)
    return None, False


def run_as_rank(cfg: Config, ranks: dict[str, str], resume: bool, accept: bool, add_prefix_space: bool) -> None:
    """This process is one rank of a run torchrun or srun started: rank 0 takes the run lock and
    chooses the start (as the launcher below does), then every rank trains (cap_train.worker)."""
    import contextlib

    from cap_train.worker import serve_external

    os.environ.update(ranks)
    if not visible_gpus(dict(os.environ)):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    procs = int(ranks["WORLD_SIZE"])
    cfg.check_world_size(procs)
    held = contextlib.ExitStack()

    def decide():
        held.enter_context(one_run(cfg.output_dir, lambda line: click.echo(line, err=True)))
        try:
            resume_from, restart_epoch = choose_start(cfg, procs, resume, accept)
        except BaseException:
            held.close()  # the process ends without unwinding (cap_train.worker.serve)
            raise
        return resume_from, restart_epoch, str(cfg.output_dir / "logs" / run_id(dict(os.environ)))

    with held:
        serve_external(str(cfg.source), add_prefix_space, accept, decide)


def print_plan(cfg: Config, num_gpus: int | None, gpu_memory: float | None, as_json: bool) -> None:
    """cap-train --plan (cap_train/plan.py): on GPUs when this node has some or --gpu-memory is given."""
    import json

    from cap_train.plan import GIB, describe, make_plan, smallest_fit

    device = "cuda" if gpu_memory is not None or visible_gpus(dict(os.environ)) else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # this process only plans: no accelerator probe
    processes = num_gpus or cfg.pipeline_stages
    cfg.check_world_size(processes)
    plan = make_plan(cfg, processes, device)
    budget = gpu_memory * GIB if gpu_memory is not None else None
    fit = smallest_fit(cfg, budget) if budget is not None else ""
    if as_json:
        out = plan.to_dict()
        if budget is not None:
            out["gpu_memory_bytes"] = budget
            out["fits"] = max(plan.peaks()) <= budget
            out["smallest_fit"] = None if fit is None else {"pipeline_stages": fit[0], "load_in_4bit": fit[1]}
        click.echo(json.dumps(out, indent=1))
    else:
        for line in describe(plan, budget, fit):
            click.echo(line)


def _refuse_to_mix_runs(cfg: Config) -> None:
    """A fresh run must not write into (and prune) the checkpoints of an earlier run."""
    from cap_train.checkpoint import Checkpoints

    newest = Checkpoints(cfg.output_dir, cfg.max_checkpoints).newest()
    if newest is not None:
        raise CapError(
            f"{cfg.source}: output_dir {cfg.output_dir} holds checkpoints of an earlier run (newest: "
            f"{newest.name}); continue it with --resume-from-checkpoint, or choose another output_dir"
        )


if __name__ == "__main__":
    main()
