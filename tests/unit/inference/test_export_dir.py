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


def test_transformers_runs_a_grouped_query_mixtral_export_with_its_own_head_dim(tokenizer_file, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
    model = make_model(3, **MIXTRAL_LIKE, num_kv_heads=2, head_dim=24)
    out = export_state_dict(model.state_dict(), model.cfg, tmp_path / "gqa", tokenizer=tokenizer_file)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["head_dim"]) == ("mixtral", 2, 24)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.model.layers[0].self_attn.k_proj.weight.shape == (48, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS).logits, atol=1e-4, rtol=1e-4)
    config.pop("ava_config")  # Ava reads a transformers-written GQA Mixtral config too
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_model(out)
    assert (loaded.model.cfg.num_kv_heads, loaded.model.cfg.head_dim) == (2, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


NEW_ARCHITECTURE = {**MIXTRAL_LIKE, "num_layers": 3, "num_kv_heads": 1, "qk_norm": "full", "attn_bias": True,
                    "first_dense_layers": 1, "dense_ffn_size": 96, "shared_experts": 1, "shared_expert_gate": True,
                    "router_score": "sigmoid", "normalize_top_k": False, "routed_scaling_factor": 2.0}


def test_every_architecture_option_exports_in_avas_layout_and_reloads_exactly(tokenizer_file, tmp_path):
    model = make_model(4, **NEW_ARCHITECTURE)
    with pytest.raises(ValueError) as err:
        export_state_dict(model.state_dict(), model.cfg, tmp_path / "x", tokenizer=tokenizer_file, layout="mixtral")
    for problem in ("model.qk_norm='full' (Mixtral has no q/k norm)", "model.attn_bias=true",
                    "dense layers [0] (every Mixtral layer is MoE)", "model.shared_experts=1",
                    "router_score='sigmoid', normalize_top_k=False, routed_scaling_factor=2.0"):
        assert problem in str(err.value)
    out = export_state_dict(model.state_dict(), model.cfg, tmp_path / "ava", tokenizer=tokenizer_file)
    assert json.loads((out / "config.json").read_text())["model_type"] == "ava"
    loaded = load_model(out)
    assert loaded.model.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, model(IDS).logits)
