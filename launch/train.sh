#!/usr/bin/env bash
# One node: every visible GPU if there are any, else NPROC CPU processes (DS_ACCELERATOR=cpu,
# gloo). Arguments are Hydra overrides.
#   launch/train.sh experiment=cpu_demo logger=none      # CPU: 1 process using all cores
#   NPROC=2 launch/train.sh experiment=smoke             # CPU: 2 ranks (ZeRO shards them)
#   launch/train.sh model=small deepspeed=zero3          # GPU node: all GPUs
#   NPROC=4 MASTER_PORT=29600 launch/train.sh ...        # GPU node: 4 of its GPUs
#
# SIGTERM to this script (a scheduler's preemption, `kill PID`) is passed to the training ranks
# themselves: they finish the step, agree, save a checkpoint and exit 143, and so does this script
# (130 after Ctrl-C): "stopped early, rerun the same command to continue", which a scheduler
# treats as a preemption. 0 means finished. (DeepSpeed's own launcher answers SIGTERM by
# terminating its children and exiting 1, hence the forwarding below.)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate && -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi

PORT="${MASTER_PORT:-29500}"
NGPU=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [[ "$NGPU" -gt 0 ]]; then
  NPROC="${NPROC:-$NGPU}"
else
  export DS_ACCELERATOR=cpu
  NPROC="${NPROC:-1}"
  CORES=$(nproc)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
fi

# The ranks are the launcher's grandchildren (deepspeed -> deepspeed.launcher.launch -> ranks);
# exits 1 when there are none yet (a SIGTERM during start-up is kept and sent once they exist).
signal_ranks() {
  python - "$1" "$2" <<'PY'
import signal, sys
import psutil
launcher, name = int(sys.argv[1]), sys.argv[2]
sent = 0
# a process that ends while we look (a short-lived helper of the launcher) is skipped, never an
# error: an error after some ranks got the signal would make the caller send it again
for child in psutil.Process(launcher).children():
    try:
        ranks = child.children()
    except psutil.NoSuchProcess:
        continue
    for rank in ranks:
        try:
            rank.send_signal(getattr(signal, name))
            sent += 1
        except psutil.NoSuchProcess:
            pass
sys.exit(0 if sent else 1)
PY
}

deepspeed --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank --module ava.train "$@" &
LAUNCHER=$!
PENDING=""
trap 'PENDING=1' TERM
trap ':' INT  # Ctrl-C reaches every process of the terminal's foreground group already
set +e
while kill -0 "$LAUNCHER" 2>/dev/null; do
  if [[ -n "$PENDING" ]]; then
    if signal_ranks "$LAUNCHER" SIGTERM 2>/dev/null; then PENDING=""; else sleep 1; fi
  else
    wait "$LAUNCHER"  # returns early when the trap fires
  fi
done
wait "$LAUNCHER"  # the launcher's own exit status (bash keeps it after the process is gone)
