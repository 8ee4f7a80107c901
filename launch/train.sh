#!/usr/bin/env bash
# One node: every visible GPU if there are any, else NPROC CPU processes (DS_ACCELERATOR=cpu,
# gloo). Arguments are Hydra overrides.
#   launch/train.sh experiment=cpu_demo logger=none      # CPU: 1 process using all cores
#   NPROC=2 launch/train.sh experiment=smoke             # CPU: 2 ranks (ZeRO shards them)
#   launch/train.sh model=small deepspeed=zero3          # GPU node: all GPUs
#   NPROC=4 MASTER_PORT=29600 launch/train.sh ...        # GPU node: 4 of its GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate && -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi

PORT="${MASTER_PORT:-29500}"
NGPU=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [[ "$NGPU" -gt 0 ]]; then
  exec deepspeed --num_gpus "${NPROC:-$NGPU}" --master_port "$PORT" --no_local_rank \
    --module ava.train "$@"
fi

export DS_ACCELERATOR=cpu
NPROC="${NPROC:-1}"
CORES=$(nproc)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank \
  --module ava.train "$@"
