"""What `ava-export` leaves on disk and says: modes the user's umask asks for (an export on shared
storage must be loadable by a colleague), and a run directory without a checkpoint named as such."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from ava.config import model_preset
from ava.export import ExportError, export_checkpoint, export_state_dict
from ava.model import AvaForCausalLM


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_export_modes_follow_the_umask(umask, tmp_path, tokenizer_file):
    torch.manual_seed(0)
    model = AvaForCausalLM(model_preset("nano"))
    old = os.umask(umask)
    try:
        out = export_state_dict(model.state_dict(), model.cfg, tmp_path / "m", tokenizer=tokenizer_file,
                                max_shard_size="200KB")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = sorted(out.iterdir())
    assert any(f.suffix == ".safetensors" for f in files) and (out / "config.json") in files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_a_run_directory_without_a_checkpoint_is_named_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("step 1/100 ...\n")
    with pytest.raises(ExportError) as err:
        export_checkpoint(run, tmp_path / "out")
    assert str(err.value).startswith(f"{run} is a run directory with no checkpoint yet: training saves one "
                                     "every trainer.save_every steps and at the end")
    (run / "checkpoints").mkdir()  # created, still empty
    with pytest.raises(ExportError, match="is a run directory with no checkpoint yet"):
        export_checkpoint(run, tmp_path / "out")
    stranger = tmp_path / "photos"
    stranger.mkdir()
    with pytest.raises(ExportError, match="is neither a run directory"):
        export_checkpoint(stranger, tmp_path / "x")
