"""Which devices a cap-train run uses — decided here and nowhere else.

Launcher side (cap_train.cli, without importing torch when there is no GPU):
    visible_gpus(env)                 this node's GPUs as CUDA names them to this process:
                                      CUDA_VISIBLE_DEVICES's entries (indices, GPU-/MIG- UUIDs)
                                      when set, else 0..n-1; none when DS_ACCELERATOR is not cuda
    choose_gpus(visible, include, exclude, num)
                                      the ones the ranks get, in rank order (DeepSpeed's
                                      --include/--exclude forms, never a GPU the user hid)
Every rank then sees CUDA_VISIBLE_DEVICES = the chosen list and uses entry LOCAL_RANK of it,
which is the index DeepSpeed itself binds (engine, pipeline module, process group).

Worker side (cap_train.worker):
    backend_and_device(local_rank)    from DeepSpeed's accelerator, so that the communication
                                      backend and the device of every tensor always agree
                                      (DS_ACCELERATOR=cpu on a GPU host gives gloo + CPU).
"""

from __future__ import annotations

import socket
from pathlib import Path

from cap_common.errors import CapError

LOCAL_HOSTS = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}


def cuda_device_count() -> int:
    """CUDA devices torch can use here; without an NVIDIA device node none, said without torch (2 s)."""
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus(env: dict[str, str], count: int | None = None) -> list[str]:
    """CUDA devices this process may use (`count` of them; default: cuda_device_count()), named as
    CUDA_VISIBLE_DEVICES names them; none when DS_ACCELERATOR chooses another accelerator."""
    if env.get("DS_ACCELERATOR", "cuda") != "cuda":
        return []
    count = cuda_device_count() if count is None else count
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    # CUDA enumerates the entries in order (MIG: only the first instance), `count` of them in all
    return [e.strip() for e in listed.split(",") if e.strip()][:count]


def _slots(spec: str, flag: str) -> list[str]:
    """The device names of a DeepSpeed-style `[HOST:]A,B` for this node (`HOST@HOST2:…` forms are
    multi-node and need --hostfile)."""
    slots: list[str] = []
    for part in spec.split("@"):
        host, sep, devs = part.strip().rpartition(":")
        if not sep:  # "0,1" or a bare host name
            host, devs = ("", part) if part.replace(",", "").strip().isdigit() else (part.strip(), "")
        if host and host not in LOCAL_HOSTS:
            raise CapError(f"{flag} {spec}: names host {host!r}; without --hostfile cap-train runs on this node only")
        if not devs:
            raise CapError(f"{flag} {spec}: name the GPUs, e.g. localhost:0,1")
        slots += [d.strip() for d in devs.split(",") if d.strip()]
    return slots


def choose_gpus(
    visible: list[str], include: str | None, exclude: str | None, num: int | None, cvd: str | None = None
) -> list[str]:
    """The GPUs of this node the ranks get, rank r on entry r.

    include: DeepSpeed's `localhost:1,3` (or `1,3`): exactly those, in that order; exclude: all
    visible but those; num (--num-gpus): the first num of what remains (default: all of it).
    Every GPU named must be one CUDA_VISIBLE_DEVICES (cvd, said in errors) leaves visible: cap never
    uses a hidden GPU."""
    seen = f"the GPUs this process sees: {', '.join(visible) or 'none'}"
    if cvd is not None:
        seen += f" (CUDA_VISIBLE_DEVICES={cvd})"
    if include and exclude:
        raise CapError("--include and --exclude: give one of them")
    if (include or exclude) and not visible:
        raise CapError(f"{'--include' if include else '--exclude'}: this node has no GPU that CUDA can use")
    chosen = list(visible)
    if include:
        chosen = list(dict.fromkeys(_slots(include, "--include")))
        hidden = [d for d in chosen if d not in visible]
        if hidden:
            raise CapError(f"--include {include}: GPU {', '.join(hidden)} is not among {seen}")
    elif exclude:
        gone = _slots(exclude, "--exclude")
        unknown = [d for d in gone if d not in visible]
        if unknown:
            raise CapError(f"--exclude {exclude}: GPU {', '.join(unknown)} is not among {seen}")
        chosen = [d for d in visible if d not in gone]
        if not chosen:
            raise CapError(f"--exclude {exclude}: leaves no GPU of {seen}")
    if num is not None and visible:
        if num > len(chosen):
            raise CapError(f"--num-gpus {num}: only {len(chosen)} GPU(s) to use ({', '.join(chosen)}); {seen}")
        chosen = chosen[:num]
    if len(chosen) > 1 and any(d.startswith("MIG-") for d in chosen):
        raise CapError(
            f"{len(chosen)} MIG instances ({', '.join(chosen)}): a CUDA process can use only one MIG instance, "
            "so a node with MIG runs one rank (--num-gpus 1, or one --include entry)"
        )
    return chosen


def backend_and_device(local_rank: int):
    """(communication backend, this rank's torch.device), both from DeepSpeed's accelerator."""
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return "gloo", torch.device("cpu")  # cap's CPU path is gloo (DeepSpeed would pick oneCCL if installed)
    return accelerator.communication_backend_name(), torch.device(accelerator.device_name(), local_rank)


def resolves_to_loopback(host: str) -> bool:
    """Whether `host` resolves to a loopback address (or not at all), as gloo would find it."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return True


def interface_towards(address: str) -> str | None:
    """The name of this host's network interface on the route to `address` (None: loopback, no
    route, or not found). A UDP socket is connected (no packet is sent) and its local address matched."""
    import fcntl
    import ipaddress
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(address), 9))
            local = s.getsockname()[0]
        if ipaddress.ip_address(local).is_loopback:
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except OSError:
        return None
    return None
