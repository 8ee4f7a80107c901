"""The process group's life: created under the `deepspeed` launcher, `torchrun` or a plain process,
and ended without interpreter finalization. (Rank, barrier and broadcast: `ava.dist`.)

The launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain
`python -m ava.train` gets single-process defaults (a free local port). The backend is NCCL
(or the accelerator's own) on GPUs and gloo on CPU; `AVA_DIST_BACKEND` overrides it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import timedelta
from typing import Any, List, Optional

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ava.dist import barrier, env_rank, env_world_size, rank, world_size

log = logging.getLogger("ava.train")


def strip_local_rank(argv: List[str]) -> List[str]:
    """`argv` without the launcher's `--local_rank=N` / `--local_rank N` (also `--local-rank`),
    which Hydra would reject; its value is exported as LOCAL_RANK when that is unset."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not value and i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1
            continue
        out.append(arg)
        i += 1
    return out


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous or a launcher's master port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def default_backend() -> str:
    if os.environ.get("AVA_DIST_BACKEND"):
        return os.environ["AVA_DIST_BACKEND"]
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return "gloo" if acc.device_name() == "cpu" else acc.communication_backend_name()


_LAUNCH_STORE: Optional[Any] = None


def is_multiprocess_launch() -> bool:
    """Started by a launcher (deepspeed, torchrun, srun wrapper) with more than one rank."""
    return env_world_size() > 1 and "MASTER_ADDR" in os.environ


def launch_store() -> Any:
    """The launcher's key-value store (`env://` rendezvous; torchrun's agent store when it has
    one), joined without creating a process group: ranks exchange small values (the launch
    time) before the configuration is validated, and the process group is later built on it."""
    global _LAUNCH_STORE
    if _LAUNCH_STORE is None:
        store, _, _ = next(dist.rendezvous("env://", timeout=default_pg_timeout))
        _LAUNCH_STORE = store
    return _LAUNCH_STORE


def init_distributed(timeout_s: Optional[float] = None) -> None:
    """Join (or create) the default process group; a no-op when it already exists. Called only
    after the configuration validated, so a config error never leaves a half-built group behind.
    `timeout_s` bounds every collective: a rank that died or hangs ends the run within it."""
    if dist.is_available() and dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_s) if timeout_s else default_pg_timeout
    backend = default_backend()
    if is_multiprocess_launch():
        os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
        store = launch_store()
        store.set_timeout(timeout)
        dist.init_process_group(backend, store=store, rank=env_rank(),
                                world_size=env_world_size(), timeout=timeout)
    else:
        # a plain single process: give DeepSpeed the env a launcher would have set
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    from ava.train.ds_compat import skip_shm_all_reduce

    skip_shm_all_reduce()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timeout)
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ["LOCAL_RANK"]))
    if rank() == 0:
        log.info("process group: %s, %d rank(s), timeout %ds", backend, world_size(),
                 int(timeout.total_seconds()))


def shutdown_and_exit(code: int) -> None:
    """The end of a process that joined a process group (returns only if it never did): it
    flushes its logs and exits without interpreter finalization. Finalization with gloo's
    threads still around (the process group, the launcher's store hosted by rank 0 under the
    deepspeed launcher) can make a rank abort with `terminate called without an active
    exception`, turning a finished run or a clear refusal into a SIGABRT. After a success every
    rank first waits for the others and tears the group down; after a failure it does neither,
    because a failing rank must never wait for a peer that may not come. Training state is on
    disk and the W&B run finished before this point."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if code == 0:
        barrier()
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                   "timed out", "Timed out", "NCCL communicator was aborted")


def is_lost_peer_error(exc: BaseException) -> bool:
    """A collective failed because another rank died or hung past the process-group timeout
    (gloo raises a plain RuntimeError, NCCL and the store torch.distributed.DistError)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in LOST_PEER_SIGNS)
