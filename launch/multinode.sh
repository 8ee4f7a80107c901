#!/usr/bin/env bash
# Several nodes through the deepspeed launcher and a hostfile (see launch/hostfile.example).
#   launch/multinode.sh launch/hostfile model=base deepspeed=zero3
# Needs: passwordless ssh from this node to every host (pdsh by default; LAUNCHER=openmpi|mvapich
# to change), this repository and its .venv at the same path on every host, and a file system
# shared by all nodes for the run directory (checkpoints are written by every rank and marked
# complete by rank 0). Environment variables DeepSpeed should forward go in ./.deepspeed_env.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE="${1:?usage: launch/multinode.sh HOSTFILE [hydra overrides...]}"
shift
if [[ -f .venv/bin/activate && -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi

MASTER="${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}"
# An explicit absolute run directory, so that `trainer.resume=auto` finds it again on restart.
RUN_DIR="${RUN_DIR:-$PWD/outputs/multinode-$(date +%Y-%m-%d_%H-%M-%S)}"
exec deepspeed --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}" \
  --master_addr "$MASTER" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module ava.train "hydra.run.dir=$RUN_DIR" "$@"
