#!/usr/bin/env bash
# The wheels a GPU machine without network needs to run `ava-bench gpu`, built here into .whl/
# for Python 3.12 on manylinux x86_64, checked, and the one-line command to run there printed.
#
#   bash launch/gpu_bundle.sh        # from a checkout whose Python has pip and torch (the dev venv)
#
# The machine is assumed to hold PyTorch (2.11, CUDA 13), transformers, safetensors, tokenizers,
# einops, rich, jinja2, pyarrow, pandas, numpy, psutil, PyYAML, huggingface-hub and the rest of
# DEVICE_HAS below, and none of deepspeed, hydra-core, omegaconf, datasets, wandb. The bundle is
# what Ava needs beyond that: nothing in it replaces the machine's torch or CUDA libraries.
# Versions are the ones the test suite ran with (.ci/constraints.txt). Left out on purpose: wandb
# (the benchmark's main job runs with logger=none, and W&B is imported only by its sink).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=.whl
LIMIT_MIB=64  # what one call may carry: the working tree and the wheels together

# binary wheels for the target, downloaded as published
DOWNLOAD="hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
hydra-core omegaconf datasets dill multiprocess fsspec"
# source-only on PyPI: built here (pure Python; DeepSpeed's CUDA ops are JIT-built on first use)
BUILD="deepspeed antlr4-python3-runtime"

pin() {  # NAME -> NAME==VERSION from .ci/constraints.txt (case and -/_ insensitive)
  local want line
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS= read -r line; do
    [[ "$(echo "${line%%==*}" | tr 'A-Z_' 'a-z-')" == "$want" ]] && { echo "$line"; return; }
  done < .ci/constraints.txt
  echo "gpu_bundle: $1 is not pinned in .ci/constraints.txt" >&2
  exit 2
}

rm -rf "$OUT" && mkdir -p "$OUT"
pins=(); for name in $DOWNLOAD; do pins+=("$(pin "$name")"); done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT" "${pins[@]}"
builds=(); for name in $BUILD; do builds+=("$(pin "$name")"); done
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "${builds[@]}"

# list, check, and print the command; a failed check exits non-zero
$PY launch/gpu_bundle_check.py "$OUT" "$LIMIT_MIB"
