"""One run directory for all ranks.

`conf/config.yaml` names the run directory with `${ava_now:...}`: the launch time that rank 0
decided and broadcast before Hydra composed anything (`AVA_RUN_TIME`, when a launcher exports
it, wins), so all ranks resolve the same path. Inside the task, rank 0 also broadcasts its
final output directory, which all ranks then use: that holds even for a user's own
`hydra.run.dir` built from Hydra's per-process `${now:}`.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ava import dist
from ava.files import atomic_write_text
from ava.train import distributed

RUN_TIME_ENV = "AVA_RUN_TIME"  # ISO time, e.g. 2025-01-31T12:00:00


LAUNCH_TIME_KEY = "ava/launch_time"


def agree_on_launch_time() -> datetime:
    """Rank 0's launch time on every rank, exchanged through the launcher's key-value store
    (no process group yet: the configuration has not been validated)."""
    if os.environ.get(RUN_TIME_ENV):
        return datetime.fromisoformat(os.environ[RUN_TIME_ENV])
    now = datetime.now().replace(microsecond=0).isoformat()
    if distributed.is_multiprocess_launch():
        store = distributed.launch_store()
        if dist.env_rank() == 0:
            store.set(LAUNCH_TIME_KEY, now)
        now = store.get(LAUNCH_TIME_KEY).decode()
    return datetime.fromisoformat(now)


def register_time_resolver(launch_time: datetime) -> None:
    """`${ava_now:%Y-%m-%d}` formats the agreed launch time."""
    OmegaConf.register_new_resolver("ava_now", lambda pattern: launch_time.strftime(pattern),
                                    replace=True, use_cache=False)


def agree_on_run_dir(local_dir: Optional[str]) -> Path:
    """Rank 0's run directory on every rank, created."""
    chosen = dist.broadcast_object(str(Path(local_dir or ".").resolve()))
    path = Path(chosen)
    if dist.rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return path


STATUS_FILE = "status.json"


def write_status(run_dir: Path, status: str, step: int, exit_status: int) -> None:
    """`<run_dir>/status.json`: how the last attempt ended ("finished" or "stopped" early by a
    signal), for schedulers (launch/slurm.sbatch requeues a stopped run) and people."""
    record = {"status": status, "step": step, "exit_status": exit_status,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(record) + "\n")
