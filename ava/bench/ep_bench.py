"""`ava-bench ep`: training throughput at expert-parallel size 1 and 2 on the same ranks.

Each size is a real multi-process run (`torchrun`, one process per rank, gloo on CPU) of
`ava.bench.ep_worker`: the same preset, global batch, ZeRO-2 and AdamW; only the experts'
placement differs. Per token the expert FLOPs are the same; ep adds two all-to-alls per MoE layer
and removes the data-parallel reduction of expert gradients (each expert lives on one rank of the
group) and half the expert memory per rank at ep=2. Which wins depends on the interconnect:
measure it where you train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ava.train.distributed import free_port

EP_SIZES = (1, 2)


def run_ep(preset: str, *, ranks: int, batch: int, seq_len: int, warmup: int, steps: int,
           overrides: dict[str, Any], threads_per_rank: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for ep in EP_SIZES:
        with tempfile.TemporaryDirectory(prefix="ava-bench-ep-") as tmp:
            out = Path(tmp) / "result.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank), "PYTHONUNBUFFERED": "1"}
            if not torch.cuda.is_available():
                env["DS_ACCELERATOR"] = "cpu"
            cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks),
                   "--master_port", str(free_port()), "-m", "ava.bench.ep_worker", "--ep", str(ep),
                   "--preset", preset, "--batch", str(batch), "--seq-len", str(seq_len), "--warmup", str(warmup),
                   "--steps", str(steps), "--overrides", json.dumps(overrides), "--out", str(out)]
            print(f"[ep={ep}] {ranks} ranks, {warmup}+{steps} steps", flush=True)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0 or not out.is_file():
                tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
                results[f"ep{ep}"] = {"status": f"failed (rc={done.returncode}): " + " | ".join(tail)}
                continue
            results[f"ep{ep}"] = {"status": "ok", **json.loads(out.read_text())}
    cfg_note = {"activation": "swiglu", "bias": False, "router_jitter": 0.0, "capacity_factor": None, **overrides}
    return {"preset": preset, "ranks": ranks, "batch_per_rank": batch, "seq_len": seq_len, "warmup": warmup,
            "steps": steps, "model_overrides": cfg_note, "zero_stage": 2, "results": results}
