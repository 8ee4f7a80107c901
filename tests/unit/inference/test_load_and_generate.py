"""Load both layouts, reproduce the source model's logits, generate with and without the KV cache."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from ava.inference import GenerationError, load_model
from ava.inference.generate import GenerationConfig, generate_tokens
from ava.inference.plugins import AvaModelPlugin, ModelPlugin, ModelRegistry

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", ["ava_export", "mixtral_export"])
def test_loaded_model_reproduces_source_logits(which, request):
    path, source = request.getfixturevalue(which)
    layout = json.loads((path / "config.json").read_text())["model_type"]
    assert layout == ("ava" if which == "ava_export" else "mixtral")
    loaded = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, source(IDS).logits, atol=1e-5, rtol=1e-5)
    assert loaded.dtype == torch.float32


@pytest.mark.parametrize("which", ["ava_export", "mixtral_export"])
def test_cached_greedy_equals_uncached(which, request):
    loaded = load_model(request.getfixturevalue(which)[0])
    prompts = [[5, 9, 14, 3], [77], [100, 200, 300, 400, 401, 402]]
    kw = dict(eos_id=None, pad_id=loaded.pad_id)
    cached = generate_tokens(loaded.model, prompts, GenerationConfig(max_new_tokens=24), **kw)
    uncached = generate_tokens(loaded.model, prompts, GenerationConfig(max_new_tokens=24, use_cache=False), **kw)
    single = [generate_tokens(loaded.model, [p], GenerationConfig(max_new_tokens=24), **kw)[0] for p in prompts]
    assert cached == uncached == single
    assert all(len(c) == 24 for c in cached)


def test_text_generation_streams_and_seeds(ava_export):
    loaded = load_model(ava_export[0])
    pieces: list[str] = []
    text = loaded.generate("The quick brown", on_text=lambda _row, p: pieces.append(p), max_new_tokens=12)
    assert "".join(pieces).startswith(text) or text.startswith("".join(pieces))
    a = loaded.generate(["fox", "dog"], do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    b = loaded.generate(["fox", "dog"], do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    assert a == b and len(a) == 2


def test_stop_strings_cut_the_output(ava_export):
    loaded = load_model(ava_export[0])
    full = loaded.generate("Mixture", max_new_tokens=16)
    assert len(full) > 2
    stop = full[1:3]
    cut = loaded.generate("Mixture", max_new_tokens=16, stop_strings=[stop])
    assert stop not in cut and full.startswith(cut)


def test_empty_prompt_is_a_clear_error(ava_export):
    loaded = load_model(ava_export[0])
    with pytest.raises(GenerationError, match="empty prompt"):
        loaded.generate("   ")


def test_explicit_device_map_equals_single_device(ava_export):
    path, source = ava_export
    mapped = load_model(path, device_map={"embed": "cpu", "layers.0": "cpu", "layers.1": "cpu"})
    with torch.no_grad():
        torch.testing.assert_close(mapped.model(IDS).logits, source(IDS).logits, atol=1e-5, rtol=1e-5)


def test_int8_quantization_saves_memory_and_stays_close(ava_export):
    path, source = ava_export
    q = load_model(path, quantize="int8")
    before, after = q.quantized_bytes
    assert after < before / 3.5  # int8 weights + fp32 per-channel scales vs fp32 weights
    with torch.no_grad():
        ref, out = source(IDS).logits, q.model(IDS).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_plugin_registry_loads_lazily_and_cleanup_frees(ava_export):
    registry = ModelRegistry()
    plugin = registry.add("nano", ava_export[0])
    assert isinstance(plugin, ModelPlugin)
    assert not plugin.loaded
    meta = plugin.metadata
    assert (meta.parameters_total, meta.dtype) == (199808, "float32") and "cpu" in meta.supported_devices
    assert isinstance(registry.get("nano").infer("fox"), str)
    assert plugin.health_check()
    ref = weakref.ref(plugin._loaded.model.embed_tokens.weight)
    registry.unload("nano")
    plugin.cleanup()  # twice is safe
    gc.collect()
    assert ref() is None and not plugin.loaded


def test_plugin_is_protocol_compatible():
    assert issubclass(AvaModelPlugin, object) and hasattr(AvaModelPlugin, "cleanup")


def test_perplexity_matches_the_models_own_loss(ava_export):
    import math

    from ava.inference.evaluate import perplexity

    path, source = ava_export
    blocks = [IDS[0, :17].numpy(), IDS[1, :17].numpy(), IDS[0, 5:22].numpy()]
    batch = torch.stack([torch.as_tensor(b) for b in blocks])
    with torch.no_grad():
        expected = math.exp(source(batch[:, :-1], labels=batch[:, 1:]).lm_loss.item())
    assert math.isclose(perplexity(load_model(path), blocks, batch_size=2), expected, rel_tol=1e-5)
