"""Metric math of ava/observe: Gini/entropy (exact values), expert-load windows, dead experts and
router-collapse alerts, throughput/FLOP/s/MFU, memory, sinks (JSONL events, W&B mode, redaction)."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from ava.model.losses import entropy, gini
from ava.observe import JsonlSink, StepOutput, TrainState
from ava.observe.experts import ExpertMonitor, max_gini
from ava.observe.memory import MemoryMonitor
from ava.observe.throughput import StepTimer, device_peak_tflops, flops_metrics, peak_tflops
from ava.observe.wandb_sink import WandbSink, redact, wandb_mode


@pytest.mark.parametrize("experts", [2, 4, 8])
def test_gini_and_entropy_exact_for_uniform_and_one_hot(experts):
    uniform = torch.full((experts,), 7.0)
    one_hot = torch.zeros(experts)
    one_hot[1] = 12.0
    assert gini(uniform).item() == 0.0
    assert entropy(uniform).item() == pytest.approx(math.log(experts), abs=1e-6)
    assert gini(one_hot).item() == pytest.approx((experts - 1) / experts, abs=1e-7)
    assert entropy(one_hot).item() == 0.0
    assert max_gini(experts, 1) == pytest.approx((experts - 1) / experts)
    two_hot = torch.zeros(experts)
    two_hot[:2] = 5.0
    assert gini(two_hot).item() == pytest.approx(max_gini(experts, 2), abs=1e-7)


def _stats(counts, dropped=0.1, aux=1.0, z=2.0):
    return SimpleNamespace(tokens_per_expert=torch.tensor(counts, dtype=torch.float32),
                           dropped_fraction=torch.tensor(dropped), aux_loss=torch.tensor(aux),
                           z_loss=torch.tensor(z), gini=None, entropy=None)


def _monitor(**kw):
    args = dict(num_layers=2, num_experts=4, top_k=2, log_every=2, heatmap_every=2,
                dead_expert_steps=3, collapse_gini=0.9, collapse_steps=2, device="cpu")
    args.update(kw)
    return ExpertMonitor(**args)


def _step(mon, state, layers):
    for micro in layers:
        mon.post_micro_batch(state, micro)
    state.step += 1
    out = StepOutput(0.0)
    mon.post_step(state, out)
    return out


def test_expert_window_metrics_heatmap_dead_experts_and_collapse_alert():
    mon = _monitor()
    state = TrainState(step=0, max_steps=100)
    mon.on_train_start(state)
    balanced = [_stats([2, 2, 2, 2]), _stats([4, 4, 0, 0], dropped=0.3, aux=3.0)]
    out = _step(mon, state, [balanced, balanced])  # step 1: not a log step
    assert out.metrics == {} and out.events == []
    out = _step(mon, state, [balanced])  # step 2: window of 3 micro-batches
    m = out.metrics
    assert m["moe/layer0/gini"] == 0.0 and m["moe/layer0/entropy"] == pytest.approx(math.log(4))
    assert m["moe/layer1/gini"] == pytest.approx(0.5) and m["moe/layer1/max_load"] == 2.0
    assert m["moe/layer1/min_load"] == 0.0
    assert m["moe/layer1/dropped_fraction"] == pytest.approx(0.3)
    assert m["moe/layer1/aux_loss"] == pytest.approx(3.0) and m["moe/layer0/z_loss"] == 2.0
    assert m["moe/dead_experts"] == 0.0  # experts 2, 3 of layer 1 idle for 2 < 3 steps
    assert m["moe/load_heatmap"] == [[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]
    assert out.events == []  # layer 1 Gini/max = 1.0 > 0.9, but only since step 2
    _step(mon, state, [balanced])
    out = _step(mon, state, [balanced])  # step 4: idle for 4 >= 3 steps; collapse since 2
    assert out.metrics["moe/layer1/dead_experts"] == 2.0 and out.metrics["moe/dead_experts"] == 2.0
    assert [(e["kind"], e["layer"]) for e in out.events] == [("router_collapse", 1)]
    assert "dead experts [2, 3]" in out.events[0]["text"] and "Gini" in out.events[0]["text"]
    _step(mon, state, [balanced])
    assert _step(mon, state, [balanced]).events == []  # alerted once, not every log step
    restored = _monitor()
    restored.load_state_dict(mon.state_dict())
    restored.on_train_start(state)
    assert torch.equal(restored.last_seen, mon.last_seen)


def test_step_timer_flops_and_peak_table():
    timer = StepTimer()
    timer.start_step(sync=True)
    for phase in ("data", "forward", "backward", "health", "step", "forward"):
        timer.begin(phase)
        timer.end()
    m = timer.metrics()
    assert set(m) == {f"perf/time_{p}_s" for p in StepTimer.PHASES} and all(v >= 0 for v in m.values())
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some CPU") is None
    assert device_peak_tflops(torch.device("cpu"), None) is None
    assert device_peak_tflops(torch.device("cpu"), 100.0) == 100.0
    assert flops_metrics(6e9, 1000.0, None) == {"perf/tflops_per_device": 6.0}
    assert flops_metrics(6e9, 1e5, 1000.0)["perf/mfu"] == pytest.approx(0.6)


def test_memory_monitor_reports_host_and_warns_once(caplog):
    mon = MemoryMonitor(warn_fraction=1e-9)
    with caplog.at_level(logging.WARNING, logger="ava.train"):
        first = mon.sample()
        mon.sample()
    assert first["mem/host_rss_gb"] > 0 and 0 < first["mem/host_used_fraction"] < 1
    assert "mem/cuda_allocated_gb" not in first
    assert sum("OOM risk: host memory" in r.message for r in caplog.records) == 1


def test_jsonl_sink_writes_metrics_and_events(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log_metrics(None, {"train/loss": math.nan, "moe/load_heatmap": [[0.5, 0.5]]}, 3)
    sink.on_event(None, {"event": "incident", "step": 3, "value": math.inf})
    sink.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["step"] == 3 and rec["train/loss"] == "nan" and rec["moe/load_heatmap"] == [[0.5, 0.5]]
    ev = json.loads((tmp_path / "events.jsonl").read_text())
    assert ev["event"] == "incident" and ev["value"] == "inf"


def test_wandb_mode_never_prompts(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    mode, note = wandb_mode(None)
    assert mode == "offline" and "no API key" in note and "logging offline" in note
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == ("disabled", None)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(None)[0] == "offline"  # online without a key would prompt
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == ("online", None)
    assert wandb_mode("offline") == ("offline", None)


def test_redact_removes_secrets_by_key_and_by_environment_value(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    config = {"logger": {"api_key": "abc", "tags": ["x", "hf_secretsecretsecret"]},
              "data": {"tokenizer": {"eos_token": "<|endoftext|>"}, "hf_token": None},
              "model": {"name": "hf_secretsecretsecret"}}
    out = redact(config, ["api_key", "hf_token"])
    assert out == {"logger": {"api_key": "<redacted>", "tags": ["x", "<redacted>"]},
                   "data": {"tokenizer": {"eos_token": "<|endoftext|>"}, "hf_token": None},
                   "model": {"name": "<redacted>"}}


def test_wandb_step_stays_monotonic_after_a_rollback():
    sink = WandbSink.__new__(WandbSink)
    sink._offset, sink._last = 0, 0
    # a repeated step (train metrics, then eval) shares its row; a rollback continues after it
    assert [sink._step(s) for s in (1, 2, 3, 3, 2, 3, 4)] == [1, 2, 3, 3, 4, 5, 6]


def test_an_empty_wandb_mode_counts_as_unset_and_an_unknown_one_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "")  # what CI templates export
    mode, note = wandb_mode(None)
    assert mode == "offline" and note.startswith("W&B: no API key")
    sink = WandbSink(tmp_path / "run", project="ava", entity=None, group=None, name=None, tags=[],
                     mode=None, config={"a": 1}, resumed=False)  # W&B itself refused "" before
    sink.log_metrics(None, {"train/loss": 1.0}, 1)
    sink.close()
    assert sink.where.startswith("W&B run (offline): ")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert wandb_mode(None) == ("offline", "W&B: WANDB_MODE='sometimes' is not one of online, offline, "
                                           "disabled: logging offline")
