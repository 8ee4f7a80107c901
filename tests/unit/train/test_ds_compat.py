"""DeepSpeed is checked once, before any process group: a release outside the tested range is
refused with the version, the range and the command that fixes it."""

import os
import subprocess
import sys

import deepspeed
import pytest

from ava.config import ConfigError
from ava.train.ds_compat import TESTED_RANGE, check_deepspeed, missing_internals


def test_installed_deepspeed_is_in_range_and_has_every_internal():
    low, high = TESTED_RANGE
    assert low <= type(low)(deepspeed.__version__) < high
    assert missing_internals() == []
    check_deepspeed()


@pytest.mark.parametrize("version", ["0.18.0", "0.20.0"])
def test_a_release_outside_the_range_is_refused_with_the_fix(version):
    with pytest.raises(ConfigError) as err:
        check_deepspeed(version)
    assert str(err.value) == (
        f"DeepSpeed {version} is installed; Ava is tested with deepspeed>=0.19.8,<0.20 (it uses "
        "DeepSpeed internals that change between releases): pip install 'deepspeed>=0.19.8,<0.20'")


def test_the_process_group_starts_without_deepspeeds_shared_memory_all_reduce():
    """Building it cost the main job 25 s and 1.5 GB compiler processes on a fresh machine, and
    every rank a /dev/shm segment, for a kernel only DeepSpeed's tensor-parallel inference uses."""
    code = ("from ava.train.distributed import init_distributed; init_distributed(); "
            "import deepspeed.comm.comm as c; print('shm op:', c.cdb.shm_comm_op)")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WORLD_SIZE": "1"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "shm op: None" in proc.stdout and "built successfully" not in proc.stdout + proc.stderr
