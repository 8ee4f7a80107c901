"""Checkpoints that `transformers` itself writes, one tiny random model per family (GQA with 2 kv
heads of 4, 8 experts, untied embeddings): Ava reads the directory `save_pretrained` wrote and
computes the same logits and the same greedy continuation."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch

from ava.inference import load_model
from ava.inference.errors import CheckpointFormatError
from ava.inference.generate import GenerationConfig, generate_tokens

transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.1, eos_token_id=None,
              bos_token_id=None, pad_token_id=None, max_position_embeddings=256)
FAMILIES = {  # model_type: (config class, model class, the family's own settings)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=24,
                       norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, decoder_sparse_step=1)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
}
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))


def save_family(model_type: str, root, tokenizer_file, **overrides):
    config_cls, model_cls, own = FAMILIES[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **own, **overrides})
    hf = getattr(transformers, model_cls)(config).eval()
    path = root / model_type
    hf.save_pretrained(path)
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path, hf


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_ava_computes_what_transformers_computes(model_type, tokenizer_file, tmp_path, caplog):
    path, hf = save_family(model_type, tmp_path, tokenizer_file)
    with caplog.at_level(logging.INFO, logger="ava.inference"):
        loaded = load_model(path)
    assert caplog.text.count("was not written by ava-export: it has no checksums") == 1
    model = loaded.model
    with torch.no_grad():
        ours, theirs = model(IDS).logits, hf(IDS).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-5
    assert float(theirs.std()) > 0.05  # not a comparison of near-zero logits
    prompts = IDS[:, :5].tolist()
    new = generate_tokens(model, prompts, GenerationConfig(max_new_tokens=20, stop_at_eos=False),
                          eos_id=None, pad_id=0)
    expected = hf.generate(IDS[:, :5], max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert new == expected[:, 5:].tolist()


def test_each_family_maps_its_own_features(tokenizer_file, tmp_path):
    cfgs = {t: load_model(save_family(t, tmp_path, tokenizer_file)[0]).model.cfg for t in sorted(FAMILIES)}
    assert (cfgs["olmoe"].qk_norm, cfgs["olmoe"].normalize_top_k, cfgs["olmoe"].kv_heads) == ("full", False, 2)
    q3 = cfgs["qwen3_moe"]
    assert (q3.qk_norm, q3.head_dim, q3.moe_layers, q3.dense_ffn_size, q3.normalize_top_k) == ("head", 24, [0, 2], 96,
                                                                                              True)
    q2 = cfgs["qwen2_moe"]
    assert (q2.attn_bias, q2.shared_experts, q2.shared_ffn_size, q2.shared_expert_gate) == (True, 1, 48, True)
    for dense in ("llama", "qwen2", "qwen3"):
        assert cfgs[dense].moe_layers == [] and cfgs[dense].dense_ffn_size is None and cfgs[dense].ffn_size == 96
    assert (cfgs["qwen2"].attn_bias, cfgs["qwen3"].qk_norm, cfgs["llama"].qk_norm) == (True, "head", "none")


def test_the_fused_expert_layout_of_newer_checkpoints_reads_the_same(tokenizer_file, tmp_path):
    """`gate_up_proj [E, 2I, H]` + `down_proj [E, H, I]` per layer instead of per-expert matrices."""
    from safetensors.torch import load_file, save_file

    path, hf = save_family("qwen3_moe", tmp_path, tokenizer_file)
    state = load_file(path / "model.safetensors")
    for layer in (0, 2):
        p = f"model.layers.{layer}.mlp.experts."
        gate, up, down = ([state.pop(f"{p}{e}.{w}.weight") for e in range(8)] for w in ("gate_proj", "up_proj",
                                                                                       "down_proj"))
        state[p + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
        state[p + "down_proj"] = torch.stack(down)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        ours, theirs = load_model(path).model(IDS).logits, hf(IDS).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-5


@pytest.mark.parametrize(("model_type", "change", "message"), [
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},  # as transformers 5
     "rope_type='llama3': Ava implements only the default RoPE, so this model cannot load"),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}},  # as older configs have it
     "rope_scaling={'type': 'linear', 'factor': 2.0}: Ava implements only the default RoPE, so this model cannot load"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0: Ava does not clip q/k/v, so this model cannot load"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 64},
     "use_sliding_window=True: Ava's attention has no sliding window, so this model cannot load"),
    ("llama", {"model_type": "gpt2"}, "model_type='gpt2' is not supported; expected one of ['ava', 'llama', "
                                      "'mixtral', 'olmoe', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe']"),
])
def test_a_field_ava_cannot_express_is_refused_by_name(model_type, change, message, tokenizer_file, tmp_path):
    path, _ = save_family(model_type, tmp_path, tokenizer_file)
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError) as err:
        load_model(path)
    assert str(err.value) == f"{path / 'config.json'}: {message}"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_an_ava_export_in_the_family_layout_loads_in_transformers(model_type, tokenizer_file, tmp_path):
    """transformers' model -> Ava -> `--layout <family>` -> transformers: the same logits, the
    same tensor names and config keys that `save_pretrained` writes."""
    from safetensors import safe_open

    from ava.export import export_state_dict

    path, hf = save_family(model_type, tmp_path, tokenizer_file)
    model = load_model(path).model
    out = export_state_dict(model.state_dict(), model.cfg, tmp_path / "out", tokenizer=tokenizer_file,
                            layout=model_type)
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    exported = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] \
        if (out / "model.safetensors.index.json").is_file() else None
    if exported is None:
        with safe_open(out / "model.safetensors", "pt") as f:
            exported = dict.fromkeys(f.keys())
    assert set(exported) == names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, hf(IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_model_another_family_cannot_express_is_refused_naming_the_settings(tokenizer_file, tmp_path):
    from ava.export import export_state_dict

    path, _ = save_family("qwen2_moe", tmp_path, tokenizer_file)
    model = load_model(path).model
    with pytest.raises(ValueError) as err:
        export_state_dict(model.state_dict(), model.cfg, tmp_path / "x", tokenizer=tokenizer_file, layout="olmoe")
    message = str(err.value)
    assert message.startswith("this model cannot be exported in the olmoe layout; differing settings: ")
    for fact in ("qk_norm='none' (the olmoe layout gives 'full')", "attn_bias=True (the olmoe layout gives False)",
                 "shared experts (width, gate)=(48, True) (the olmoe layout gives None)"):
        assert fact in message
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("model_type", "moe_layout", "moe_class"), [("llama", "mixtral", "MixtralForCausalLM"),
                                                                      ("qwen3", "qwen3_moe", "Qwen3MoeForCausalLM")])
def test_an_upcycled_dense_model_computes_the_dense_function_and_exports_as_its_moe_family(
        model_type, moe_layout, moe_class, tokenizer_file, tmp_path):
    from ava.config import compose, to_object
    from ava.export import export_state_dict
    from ava.model import AvaForCausalLM
    from ava.train.init_from import apply_source, load_weights, open_source

    path, dense = save_family(model_type, tmp_path, tokenizer_file)
    cfg = to_object(compose(["experiment=smoke", "logger=none", f"init_from={path}", "upcycle.num_experts=4",
                             "upcycle.top_k=2", "model.capacity_factor=null", "model.router_jitter=0"]))
    cfg = apply_source(cfg, open_source(str(path)), [])
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.model.moe_layers, cfg.model.ffn_size) == (4, 2, [0, 1, 2], 96)
    torch.manual_seed(0)
    model = AvaForCausalLM(cfg.model).eval()
    load_weights(model, open_source(str(path)), upcycle_noise=0.0)
    with torch.no_grad():
        theirs = dense(IDS).logits
        torch.testing.assert_close(model(IDS).logits, theirs, rtol=1e-5, atol=1e-5)  # the dense function
    out = export_state_dict(model.state_dict(), cfg.model, tmp_path / "moe", tokenizer=tokenizer_file,
                            layout=moe_layout)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == moe_class
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, theirs, rtol=1e-5, atol=1e-5)
    noisy = AvaForCausalLM(cfg.model).eval()
    load_weights(noisy, open_source(str(path)), upcycle_noise=0.01)
    experts = noisy.layers[0].moe.experts.w_down
    assert not torch.equal(experts[0], experts[1])  # the copies are perturbed apart
    with torch.no_grad():
        assert 0 < float((noisy(IDS).logits - theirs).abs().max()) < 0.1 * float(theirs.abs().max())
    # the routers' state is the model's own, the expert bias buffer included (not in a dense checkpoint)
    biased = AvaForCausalLM(dataclasses.replace(cfg.model, expert_bias=True)).eval()
    load_weights(biased, open_source(str(path)), upcycle_noise=0.0)
    assert not biased.layers[0].moe.router.balance_bias.any()
    with torch.no_grad():
        torch.testing.assert_close(biased(IDS).logits, theirs, rtol=1e-5, atol=1e-5)


def test_upcycling_an_moe_checkpoint_or_without_one_is_refused(tokenizer_file, tmp_path):
    from ava.config import ConfigError, compose, to_object
    from ava.train.init_from import apply_source, open_source

    with pytest.raises(Exception) as err:
        to_object(compose(["experiment=smoke", "upcycle.num_experts=4"]))
    message = str(err.value.__cause__ or err.value)
    assert "upcycle.num_experts=4 needs init_from=<a dense checkpoint> to upcycle" in message
    path, _ = save_family("olmoe", tmp_path, tokenizer_file)
    cfg = to_object(compose(["experiment=smoke", f"init_from={path}", "upcycle.num_experts=4"]))
    already = r"upcycle.num_experts=4: .* is already an MoE model \(olmoe, layers \[0, 1, 2\]\)"
    with pytest.raises(ConfigError, match=already):
        apply_source(cfg, open_source(str(path)), [])


def test_init_from_refuses_a_contradicting_override_and_a_directory_without_tokenizer(tokenizer_file, tmp_path):
    from ava.config import ConfigError, compose, to_object
    from ava.train.init_from import apply_source, open_source

    path, _ = save_family("qwen3_moe", tmp_path, tokenizer_file)
    overrides = ["experiment=smoke", f"init_from={path}", "model.num_layers=5", "model.capacity_factor=2.0"]
    cfg = to_object(compose(overrides))
    with pytest.raises(ConfigError) as err:
        apply_source(cfg, open_source(str(path)), overrides)
    assert str(err.value) == (f"model.num_layers=5 contradicts init_from: {path / 'config.json'} gives "
                              "num_layers=3; drop the override (the architecture comes from the checkpoint)")
    applied = apply_source(cfg, open_source(str(path)), overrides[:2] + overrides[3:])  # training settings stay
    assert (applied.model.num_layers, applied.model.capacity_factor, applied.model.head_dim) == (3, 2.0, 24)
    assert applied.data.tokenizer.path == str(path / "tokenizer.json")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ConfigError) as err:
        open_source(str(path))
    assert str(err.value).startswith(f"init_from={path}: {path} has no tokenizer.json; Ava trains on the "
                                     "checkpoint's own tokenizer: save it there")
