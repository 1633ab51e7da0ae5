"""Before a `--hostfile` run starts anything: the launcher DeepSpeed will use is installed here, and
(for pdsh) every node answers passwordless ssh — each failure one line naming what is missing.

    --launcher pdsh      pdsh over ssh to every host (DeepSpeed's default)
    --launcher openmpi   mpirun (needs ompi_info); mpich / impi: mpirun; mvapich: mpiname
    --launcher slurm     srun inside an allocation (needs sinfo)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cap_common.errors import CapError

# the program DeepSpeed's runner looks for before it starts each launcher
LAUNCHERS = {"pdsh": "pdsh", "openmpi": "ompi_info", "mpich": "mpirun", "impi": "mpirun", "mvapich": "mpiname"}
LAUNCHERS["slurm"] = "sinfo"
SSH_TIMEOUT_S = 10


def hosts(hostfile: Path) -> list[str]:
    """The hosts of a DeepSpeed hostfile (`host slots=N` lines; # comments)."""
    found = []
    for number, line in enumerate(Path(hostfile).read_text().splitlines(), start=1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.match(r"^(\S+)\s+slots=(\d+)$", line)
        if not match:
            raise CapError(f"{hostfile}, line {number}: expected `HOST slots=N`, got {line!r}")
        found.append(match.group(1))
    if not found:
        raise CapError(f"{hostfile}: no `HOST slots=N` line")
    return found


def check_launch(launcher: str, hostfile: Path) -> None:
    """One CapError naming what this launch lacks: the launcher's program, or ssh to some hosts."""
    names = hosts(hostfile)
    program = LAUNCHERS[launcher]
    if shutil.which(program) is None:
        raise CapError(
            f"--launcher {launcher}: {program} is not installed on this node (DeepSpeed needs it to start the "
            f"ranks of {hostfile}); install it, or choose another --launcher ({', '.join(LAUNCHERS)})"
        )
    if launcher != "pdsh":
        return
    with ThreadPoolExecutor(max_workers=min(32, len(names))) as pool:
        answers = list(pool.map(_ssh_problem, names))
    failed = [(host, why) for host, why in zip(names, answers) if why]
    if failed:
        shown = "; ".join(f"{host}: {why}" for host, why in failed[:4])
        more = f"; {len(failed) - 4} more" if len(failed) > 4 else ""
        raise CapError(
            f"--launcher pdsh needs passwordless ssh from this node to every host of {hostfile}, and "
            f"{len(failed)} of {len(names)} fail ({shown}{more}); set up ssh keys (ssh-copy-id), or use "
            "--launcher slurm inside an allocation"
        )


def _ssh_problem(host: str) -> str | None:
    """None when `ssh host true` succeeds without a password prompt, else its last message."""
    try:
        done = subprocess.run(
            ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host, "true"],
            capture_output=True,
            text=True,
            timeout=SSH_TIMEOUT_S + 5,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return "ssh is not installed on this node"
    except subprocess.TimeoutExpired:
        return f"no answer within {SSH_TIMEOUT_S + 5} s"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"ssh exited with code {done.returncode}"
