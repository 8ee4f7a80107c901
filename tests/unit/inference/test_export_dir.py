"""The exported directory: layouts, sharding with checksums, atomic writes, transformers interop."""

from __future__ import annotations

import json

import pytest
import torch

from ava.export import ExportError, export_state_dict
from ava.files import sha256_file
from ava.inference import load_model

from .conftest import MIXTRAL_LIKE, make_model

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


def test_sharded_export_records_every_checksum_and_loads(tokenizer_file, tmp_path):
    model = make_model()
    out = export_state_dict(model.state_dict(), model.cfg, tmp_path / "m", tokenizer=tokenizer_file,
                            max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["sha256"] == {s: sha256_file(out / s) for s in shards}
    assert set(index["weight_map"]) == set(model.state_dict())  # tied embedding written once
    with torch.no_grad():
        torch.testing.assert_close(load_model(out).model(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name


def test_existing_directory_is_never_overwritten_and_no_temp_is_left(tokenizer_file, tmp_path):
    model = make_model()
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        export_state_dict(model.state_dict(), model.cfg, target, tokenizer=tokenizer_file)
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_mixtral_layout_refused_for_incompatible_config(tokenizer_file, tmp_path):
    model = make_model()
    with pytest.raises(ValueError) as err:
        export_state_dict(model.state_dict(), model.cfg, tmp_path / "x", tokenizer=tokenizer_file, layout="mixtral")
    assert "model.norm='layernorm' (Mixtral uses 'rmsnorm')" in str(err.value)
    assert "model.activation='gelu' (Mixtral experts are 'swiglu')" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_state_dict_mismatch_is_named(tokenizer_file, tmp_path):
    model = make_model()
    state = model.state_dict()
    state.pop("norm.weight")
    with pytest.raises(ExportError, match=r"missing \['norm.weight'\]"):
        export_state_dict(state, model.cfg, tmp_path / "y", tokenizer=tokenizer_file)


def test_transformers_loads_the_mixtral_layout_with_matching_logits(mixtral_export):
    transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
    path, source = mixtral_export
    names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, source(IDS).logits, atol=1e-4, rtol=1e-4)
    out = hf.generate(IDS[:, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 10)


def test_mixtral_like_export_auto_picks_mixtral(tokenizer_file, tmp_path):
    model = make_model(2, **MIXTRAL_LIKE)
    out = export_state_dict(model.state_dict(), model.cfg, tmp_path / "auto", tokenizer=tokenizer_file)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
