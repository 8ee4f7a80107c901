"""Each loading failure raises its own error type with a message that names the file or the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ava.export import export_state_dict
from ava.inference import CheckpointFormatError, InsufficientMemoryError, UnsupportedDtypeError, load_model

from .conftest import make_model


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_is_caught_by_checksum(ava_export, tmp_path):
    path = _copy(ava_export[0], tmp_path)
    shard = path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors is corrupt: sha256"):
        load_model(path)


def test_missing_shard_and_missing_files_are_named(ava_export, tmp_path):
    path = _copy(ava_export[0], tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointFormatError, match=r"missing tokenizer\.json"):
        load_model(path)
    shutil.copy(ava_export[0] / "tokenizer.json", path / "tokenizer.json")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match=r"missing weight shard\(s\) \['model.safetensors'\]"):
        load_model(path)


def test_shape_mismatch_names_the_tensors(ava_export, tmp_path):
    path = _copy(ava_export[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["ava_config"]["ffn_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError) as err:
        load_model(path)
    assert "layers.0.moe.experts.w1: stored (4, 64, 128), model expects (4, 64, 96)" in str(err.value)


def test_raw_deepspeed_checkpoint_and_pickles_are_refused(tmp_path):
    ds = tmp_path / "run" / "checkpoints" / "step_00000010"
    ds.mkdir(parents=True)
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointFormatError, match=f"Export it first: ava-export {ds} step_00000010-export"):
        load_model(ds)
    pickled = tmp_path / "hf"
    pickled.mkdir()
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match=r"pickle-based weights \(pytorch_model\.bin\)"):
        load_model(pickled)


def test_bf16_export_keeps_bf16_and_fp16_is_unsupported_on_cpu(tokenizer_file, tmp_path):
    model = make_model()
    bf16 = export_state_dict(model.state_dict(), model.cfg, tmp_path / "bf16", tokenizer=tokenizer_file,
                             dtype="bf16")
    loaded = load_model(bf16)
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    fp16 = export_state_dict(model.state_dict(), model.cfg, tmp_path / "fp16", tokenizer=tokenizer_file,
                             dtype="fp16")
    with pytest.raises(UnsupportedDtypeError) as err:
        load_model(fp16)
    assert str(err.value).startswith("weights are float16, which cpu cannot run (it runs ['float32', 'bfloat16'])")
    assert load_model(fp16, dtype="fp32").dtype == torch.float32  # an explicit cast is allowed


def test_insufficient_memory_is_reported_with_numbers(ava_export):
    with pytest.raises(InsufficientMemoryError) as err:
        load_model(ava_export[0], max_memory={"cpu": 100_000})
    message = str(err.value)
    assert "MiB on cpu (weights + KV cache) but max_memory allows 0.1 MiB" in message
    assert "quantize='int8'" in message


def test_gpu_layers_without_a_gpu_is_a_clear_error(ava_export):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU-only message does not apply")
    with pytest.raises(InsufficientMemoryError, match="gpu_layers=1 asked for, but no GPU is available here"):
        load_model(ava_export[0], gpu_layers=1)


def test_a_config_json_refusal_names_the_file_once(mixtral_export, tmp_path):
    path = _copy(mixtral_export[0], tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.pop("ava_config")  # read as a transformers Mixtral config
    config["sliding_window"] = 4096
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError) as err:
        load_model(path)
    message = str(err.value)
    assert message == (f"{path / 'config.json'}: sliding_window=4096: Ava's attention has no sliding "
                       "window, so this model cannot load")
    assert message.count("config.json") == 1
