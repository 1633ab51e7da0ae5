"""Start-up checks that every rank makes before training, agreed among all ranks; the timeouts.

A run over several nodes fails most often at its start: a node that does not see the config, the
model, the checkpoint, the prepared data, or the same output folder (storage not shared), or that
reads another version of the config. Each rank makes the checks itself, then the ranks exchange
what they found (`agree`) and compare their configs and cap's version with rank 0's (`same_run`):
a problem on one rank stops every rank at once — one line naming rank, host and problem, the
others stop quietly — instead of that rank exiting alone while the others wait in their next
collective until its timeout.

Timeouts: every collective (DeepSpeed's pipeline and data-parallel groups included) times out
after the collective timeout (5 minutes, more than a healthy step waits; CAP_COLLECTIVE_TIMEOUT_MIN),
which is also how long a rank's heartbeat may stay silent (cap_train.watch). Only waits on one rank's
long solo work are longer, on gloo groups of their own with the prepare timeout (4 hours;
CAP_PREPARE_TIMEOUT_MIN): rank 0's data preparation, loading the model, writing checkpoints and
epoch outputs (`long_barrier`).
"""

from __future__ import annotations

import datetime
import os
import secrets
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from cap_common.config import Config, load_config
from cap_common.errors import CapError
from cap_common.files import HOST, os_error_message

SHARED_WAIT_S = 10.0  # how long a rank waits to see a file another node wrote (NFS attribute caching)


class PeerFailed(Exception):
    """Another rank failed at start-up and reports it; this rank stops without a line of its own."""


def _minutes(variable: str, default: float) -> datetime.timedelta:
    value = os.environ.get(variable, "")
    try:
        minutes = float(value) if value else default
    except ValueError:
        raise CapError(f"{variable}={value!r}: expected a number of minutes") from None
    return datetime.timedelta(minutes=minutes)


def collective_timeout() -> datetime.timedelta:
    return _minutes("CAP_COLLECTIVE_TIMEOUT_MIN", 5)


def prepare_timeout() -> datetime.timedelta:
    return _minutes("CAP_PREPARE_TIMEOUT_MIN", 240)


_long_group = None


def long_barrier() -> None:
    """A barrier that waits up to the prepare timeout: after work one rank may do much longer than
    the others (loading its stage, writing its part of a checkpoint, rank 0 writing epoch<N>/)."""
    global _long_group
    if dist.get_world_size() == 1:
        return
    if _long_group is None:
        _long_group = dist.new_group(backend="gloo", timeout=prepare_timeout())
    dist.barrier(group=_long_group)


def use_collective_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every process group created from now on: DeepSpeed creates its
    pipeline and data-parallel groups with new_group() and no timeout, which torch's module-level
    defaults (30 minutes for gloo, 10 for NCCL) would otherwise fill in."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def attempt(check: Callable[[], object]) -> str | None:
    """Run one check; its problem as one line, or None."""
    try:
        check()
    except CapError as e:
        return str(e)
    except OSError as e:
        return os_error_message(e)
    return None


def agree(problem: str | None) -> None:
    """Every rank passes its problem (or None); if any rank has one, every rank raises: the lowest
    failing rank a CapError naming rank, host and problem, the others PeerFailed."""
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, (HOST, problem))
    failed = [(rank, host, text) for rank, (host, text) in enumerate(found) if text]
    if not failed:
        return
    rank, host, text = failed[0]
    if dist.get_rank() != rank:
        raise PeerFailed(f"rank {rank} on {host} failed its start-up checks: {text}")
    more = [str(r) for r, _, _ in failed[1:]]
    also = f"; rank(s) {', '.join(more)} failed start-up checks too" if more else ""
    raise CapError(f"start-up check failed: {text}{also}; every rank stopped")


def seen_within(exists: Callable[[], bool], seconds: float = SHARED_WAIT_S) -> bool:
    """Whether `exists()` turns true within `seconds` (another node's write may show late on NFS)."""
    deadline = time.monotonic() + seconds
    while not exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def check_start(config: str, overrides: dict | None, resume_from: str | None) -> Config:
    """Every rank: the config loads; output_dir is one folder all ranks share and can write; the
    model and the checkpoint to resume from are there. Returns this rank's config."""
    rank = dist.get_rank()
    cfg: Config | None = None

    def load():
        nonlocal cfg
        cfg = load_config(config, overrides)

    problem = attempt(load)
    box = [secrets.token_hex(6) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    marker = Path(cfg.output_dir) / f".cap-start-{box[0]}" if cfg is not None else None
    try:
        if rank == 0 and problem is None:
            problem = attempt(lambda: _write_marker(marker))
        agree(problem)
        agree(attempt(lambda: _check_node(cfg, marker, rank, resume_from)))
        same_run(cfg)
    finally:
        if rank == 0 and marker is not None:
            marker.unlink(missing_ok=True)
    return cfg


def same_run(cfg: Config) -> None:
    """Every rank trains what rank 0 trains: each compares cap's version and its config (every key,
    as its node read it; each node reads its own copy) with rank 0's. On a difference every rank
    stops, rank 0 with one line naming each differing rank, its host and keys, the others quietly."""
    mine = {"cap version": _cap_version(), **cfg.to_dict()}
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, (HOST, str(cfg.source), mine))
    _, _, first = found[0]
    differing = []
    for rank, (host, source, other) in enumerate(found[1:], start=1):
        keys = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if keys:
            shown = ", ".join(f"{k} = {other.get(k)!r} (rank 0: {first.get(k)!r})" for k in keys[:4])
            differing.append(f"rank {rank} on {host} ({source}): {shown}{' …' if len(keys) > 4 else ''}")
    if not differing:
        return
    if dist.get_rank() != 0:
        raise PeerFailed(f"the ranks' configs differ: {differing[0]}")
    more = f"; {len(differing) - 3} more ranks differ" if len(differing) > 3 else ""
    raise CapError(
        f"start-up check failed: the ranks' configs differ (every node reads its own copy of the config): "
        f"{'; '.join(differing[:3])}{more}; every rank stopped"
    )


def _cap_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cap")
    except PackageNotFoundError:
        return "unknown"


def _write_marker(marker: Path) -> None:
    """Rank 0 creates output_dir and writes the marker the other ranks look for; a failure (a full
    disk, no permission) is a CapError naming output_dir and the file."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(HOST)
    except OSError as e:
        raise CapError(f"output_dir {marker.parent}: cannot write there ({os_error_message(e, marker)})") from None


def _check_node(cfg: Config, marker: Path, rank: int, resume_from: str | None) -> None:
    out = marker.parent
    if not seen_within(marker.exists):
        raise CapError(
            f"output_dir {out} does not hold the marker file rank 0 wrote into its output_dir: output_dir must "
            "be one folder that every node shares (NFS, Lustre, …), at the same path"
        )
    probe = out / f"{marker.name}.rank{rank}"
    try:
        probe.write_text(HOST)
    except OSError as e:
        raise CapError(f"output_dir {out}: cannot write there ({os_error_message(e)})") from None
    probe.unlink(missing_ok=True)
    if not (Path(cfg.model_dir) / "config.json").is_file():
        raise CapError(f"model_dir {cfg.model_dir}: no config.json on this node (the model must be at this path)")
    if resume_from and not seen_within((Path(resume_from) / "state.json").is_file):
        raise CapError(f"checkpoint {resume_from}: not on this node (output_dir must be shared storage)")
