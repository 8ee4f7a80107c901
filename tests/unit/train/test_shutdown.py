"""`shutdown_and_exit` skips interpreter finalization (gloo's threads made it abort), so it must
keep everything else a normal exit gives: the status, buffered output and log records."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ava.train.distributed import free_port

SCRIPT = textwrap.dedent("""
    import logging, sys
    import torch.distributed as dist
    from ava.train.distributed import shutdown_and_exit

    code, log_file, port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    shutdown_and_exit(code)  # no process group yet: returns, the process goes on
    logging.basicConfig(filename=log_file, level=logging.INFO)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    print("printed before the exit")  # block-buffered: stdout is a pipe
    logging.getLogger("ava").info("logged before the exit")
    shutdown_and_exit(code)
    print("never printed")
""")


@pytest.mark.parametrize("code", [0, 2])
def test_exit_keeps_status_output_and_logs(code, tmp_path):
    log_file = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(code), str(log_file), str(free_port())],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stdout == "printed before the exit\n"
    assert "logged before the exit" in log_file.read_text()
