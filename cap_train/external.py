"""cap-train started once per rank by another launcher: torchrun, or Slurm's srun.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node1:29500 \\
        $(which cap-train) cfg.toml
    srun --ntasks-per-node 8 cap-train cfg.toml

Each process is one rank. Its rank, world size, local rank and rendezvous come from the launcher's
variables: torchrun's own (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), an MPI
launcher's (Open MPI, MPICH, Intel MPI, MVAPICH, with MASTER_ADDR and MASTER_PORT), or Slurm's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the allocation's first node, the port
MASTER_PORT or one derived from the job id), so no MPI is needed. Rank 0 does what cap-train's own
launcher does before any rank trains — the run lock, the choice of the checkpoint to resume from
(and its damage check), the refusal of a fresh run over an earlier run's checkpoints — once every
rank has joined, and tells the others; then every rank runs cap_train.worker's code.
"""

from __future__ import annotations

import re

from cap_common.errors import CapError

TORCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# MPI launchers' (rank, size, local rank) variables: Open MPI, MPICH / Intel MPI (PMI), MVAPICH; the
# master comes from MASTER_ADDR / MASTER_PORT, which cap-train --hostfile --launcher <mpi> exports
MPI = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
)


def launcher_environment(env: dict[str, str]) -> dict[str, str] | None:
    """torch's rank variables when another launcher started this process as one rank of several
    (None: cap-train launches the ranks itself). Slurm's are translated; a missing one is an error."""
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [k for k in TORCH if k not in env and k != "LOCAL_RANK"]
        if missing:
            raise CapError(f"RANK and WORLD_SIZE are set, but not {', '.join(missing)} (torchrun sets all of them)")
        return {k: env.get(k, "0") for k in TORCH}
    for rank, size, local in MPI:
        if rank in env and size in env and "MASTER_ADDR" in env:
            return {
                "RANK": env[rank],
                "WORLD_SIZE": env[size],
                "LOCAL_RANK": env.get(local, "0"),
                "MASTER_ADDR": env["MASTER_ADDR"],
                "MASTER_PORT": env.get("MASTER_PORT", "29500"),
            }
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_node(env.get("SLURM_JOB_NODELIST", "")),
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000),
        }
    return None


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[07-09,12],cpu1' → 'gpu07'."""
    match = re.match(r"\s*([^,\[]+)(?:\[([^-,\]]+))?", nodelist)
    if not match:
        raise CapError(f"SLURM_JOB_NODELIST={nodelist!r}: no node in it; set MASTER_ADDR to the first node's name")
    return match.group(1) + (match.group(2) or "")


def run_id(env: dict[str, str]) -> str:
    """A name every rank gives the run (its log folder): Slurm's job and step, torchrun's run id,
    else the rendezvous address."""
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    return f"rendezvous-{env['MASTER_ADDR']}-{env['MASTER_PORT']}"
