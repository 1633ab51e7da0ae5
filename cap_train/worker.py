"""One cap-train process (started by cap_train.launch, or by DeepSpeed's launcher on several
nodes): join the process group on the backend and device DeepSpeed's accelerator gives
(cap_train.devices), pass the start-up checks with every other rank (cap_train.startup), run this
rank's `Trainer` (cap_train.trainer), write the run's summary, and turn every failure into one line
and an exit code (cap_train.logs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from cap_common.errors import CapError
from cap_common.files import HOST, os_error_message, remove_stale_temps, user_os_errors, write_json_atomic
from cap_train import startup, watch
from cap_train.devices import backend_and_device
from cap_train.launch import die_with_parent
from cap_train.logs import EXIT_CRASH, EXIT_PEER_LOST, EXIT_USER, RankOutput, report_crash
from cap_train.trainer import Trainer


def clean_outputs(output_dir: Path) -> None:
    """Rank 0 at start, under the run lock: undo what interrupted writes left behind. An epoch<N>/ folder
    that a cut-short swap left renamed aside (cap_train.outputs.swap_in), with no epoch<N>/ in its place,
    gets its name back; then the stage parts and the temporaries of dead processes (unfinished epoch<N>/
    folders, set-aside ones, config.toml copies) are removed."""
    for parts in output_dir.glob("epoch*.parts"):
        shutil.rmtree(parts, ignore_errors=True)
    for aside in sorted(output_dir.glob(".epoch*.old.tmp-*")):
        folder = output_dir / aside.name[1:].split(".old.tmp-")[0]
        if not folder.exists():
            aside.rename(folder)
    for name in {p.name.split(".tmp-")[0][1:] for p in output_dir.glob(".epoch*.tmp-*")}:
        remove_stale_temps(output_dir, name)
    remove_stale_temps(output_dir, "config.toml")


def skip_shm_comm_op(deepspeed) -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op at every start.

    cap reduces with gloo (CPU) or NCCL; that op only serves DeepSpeed's inference all-reduce. Building
    it needs a compiler and takes a file lock under ~/.cache/torch_extensions that a worker killed
    during the build leaves behind, after which every later start waits on it forever.
    DeepSpeed's own gate for the op is its table of compatible ops (kept in the module, so edits stay).
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def join_process_group(output: Callable[[], RankOutput]) -> torch.device:
    """Join the process group (once) on the backend and device DeepSpeed's accelerator gives, with
    cap's collective timeout on every group, and start this rank's heartbeat (cap_train.watch);
    this rank's device."""
    import deepspeed

    skip_shm_comm_op(deepspeed)
    backend, device = backend_and_device(int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if backend == "gloo":
            choose_gloo_interface(output)
        timeout = startup.collective_timeout()
        startup.use_collective_timeout(timeout)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)

        def log(line: str) -> None:
            with output().log_only():
                print(line, file=sys.stderr, flush=True)

        watch.current = watch.Watch.start(lambda line: output().console_line(line), log)
    return device


def choose_gloo_interface(output: Callable[[], RankOutput]) -> None:
    """gloo finds this host's address from its name; where the name resolves to 127.0.0.1 (Debian's
    /etc/hosts) the other nodes cannot reach it, so the interface that routes to the master is named
    in GLOO_SOCKET_IFNAME instead (the user's own setting wins)."""
    from cap_train.devices import interface_towards, resolves_to_loopback

    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if "GLOO_SOCKET_IFNAME" in os.environ or not resolves_to_loopback(HOST):
        return
    interface = interface_towards(master)
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        with output().log_only():
            print(
                f"cap-train: {HOST} resolves to a loopback address; gloo uses interface {interface}, which "
                f"reaches the master {master} (set GLOO_SOCKET_IFNAME to choose another)",
                file=sys.stderr,
                flush=True,
            )


def run(
    config: str, resume_from: str | None, restart_epoch: bool, add_prefix_space: bool, output: RankOutput, accept=False
) -> None:
    import logging

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would bury cap's progress line
    device = join_process_group(lambda: output)
    cfg = startup.check_start(config, {"add_prefix_space": True} if add_prefix_space else None, resume_from)
    trainer = Trainer(
        cfg, device, Path(resume_from) if resume_from else None, restart_epoch, output.log_only, accept_change=accept
    )
    if dist.get_rank() == 0:
        trainer.ckpts.clean_stale()
        clean_outputs(Path(cfg.output_dir))
        from cap_common.config import run_copy
        from cap_common.files import temp_name

        # the copy resumes this run from anywhere: `cap-train <output_dir>/config.toml --resume-from-checkpoint`
        copy = Path(cfg.output_dir) / "config.toml"
        text, tmp = run_copy(cfg), copy.with_name(temp_name(copy.name))
        try:
            with user_os_errors(copy):
                copy.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, copy)
        finally:
            tmp.unlink(missing_ok=True)
        if trainer.step >= trainer.total_steps:
            print(
                f"cap-train: nothing to train: the checkpoint is at step {trainer.step}, and this config's run "
                f"ends at step {trainer.total_steps} (raise epochs or max_steps to train on)",
                file=sys.stderr,
            )
    trainer.train()
    if dist.get_rank() == 0:
        with user_os_errors(cfg.output_dir):
            write_json_atomic(
                Path(cfg.output_dir) / "summary.json",
                {"steps": trainer.step, "tokens": trainer.tokens, "epochs": trainer.epoch},
            )
        print(
            f"cap-train: done — {trainer.step} steps, {trainer.tokens:,} tokens; outputs in {cfg.output_dir}",
            file=sys.stderr,
        )
    # barrier before teardown: without it gloo can abort at exit
    dist.barrier()
    if watch.current is not None:
        watch.current.finish()
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cap_train.worker")
    parser.add_argument("config")
    parser.add_argument("--resume-from", default=None, help="checkpoint folder (chosen and checked by cap-train)")
    parser.add_argument("--restart-epoch", action="store_true", help="start the checkpoint's epoch over")
    parser.add_argument("--accept-config-change", action="store_true", help="a changed global batch restarts the epoch")
    parser.add_argument("--add-prefix-space", action="store_true")
    parser.add_argument("--log-dir", default=None, help="folder for this rank's rank<r>.log")
    args = parser.parse_args(argv)
    from cap_train.external import launcher_environment

    try:  # DeepSpeed's MPI and Slurm launchers give their own rank variables (no mpi4py needed)
        os.environ.update(launcher_environment(dict(os.environ)) or {})
    except CapError as e:
        print(f"cap-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER)
    rank = int(os.environ.get("RANK", "0"))
    output = RankOutput(args.log_dir, rank)

    def stopped(why: str) -> None:  # the line a worker leaves in its log when its launcher is gone
        with output.log_only():
            print(f"cap-train: stopped (rank {rank} on {HOST}): {why}", file=sys.stderr, flush=True)

    die_with_parent(stopped)
    serve(
        rank,
        lambda: output,
        lambda: run(
            args.config, args.resume_from, args.restart_epoch, args.add_prefix_space, output, args.accept_config_change
        ),
    )


def serve_external(config: str, add_prefix_space: bool, accept: bool, decide: Callable[[], tuple]) -> None:
    """One rank started by torchrun or srun (cap_train.external): once every rank has joined, rank 0
    runs `decide()` — the run lock and the checkpoint choice, (resume_from, restart_epoch, log_dir) —
    and tells the others, who stop quietly when it failed; then this rank trains as a worker."""
    rank = int(os.environ["RANK"])
    output = RankOutput(None, rank)  # the console, until the run's log folder is known

    def body():
        nonlocal output
        join_process_group(lambda: output)
        box: list = [None]
        if rank == 0:
            try:
                box = [("ok", decide())]
            except CapError as e:
                box = [("failed", str(e))]
        dist.broadcast_object_list(box, src=0)
        outcome, value = box[0]
        if outcome == "failed":
            if rank == 0:
                raise CapError(value)
            raise startup.PeerFailed(f"rank 0 stopped the run before it started: {value}")
        resume_from, restart_epoch, log_dir = value
        output = RankOutput(log_dir, rank)
        run(config, resume_from, restart_epoch, add_prefix_space, output, accept)

    serve(rank, lambda: output, body)


def serve(rank: int, output: Callable[[], RankOutput], body: Callable[[], None]) -> None:
    """Run `body`; every failure becomes one line (or none, for a rank that only lost its peer) and
    this process's exit code (cap_train.logs)."""
    try:
        body()
    except CapError as e:
        output().console_line(f"cap-train: error (rank {rank} on {HOST}): {e}")
        code = EXIT_USER
    except OSError as e:
        output().console_line(f"cap-train: error (rank {rank} on {HOST}): {os_error_message(e)}")
        code = EXIT_USER
    except startup.PeerFailed as e:  # the failing rank prints the line; this one only logs it, if it has a log
        if output().log_path is not None:
            with output().log_only():
                print(f"cap-train: stopped (rank {rank} on {HOST}): {e}", file=sys.stderr, flush=True)
        code = EXIT_PEER_LOST
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # noqa: BLE001 - every crash is reported, then the process ends at once
        code = report_crash(output(), e)
        if code == EXIT_PEER_LOST and watch.current is not None:
            watch.current.explain(e)  # names the rank that stopped answering, or stops quietly; never returns
    else:
        return
    if watch.current is not None and code in (EXIT_USER, EXIT_CRASH):
        watch.current.failed()  # the others stop quietly: this rank said why
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # without waiting for peers that may be gone (a normal exit can hang in gloo's teardown)


if __name__ == "__main__":
    main()
