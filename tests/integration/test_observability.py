"""Observability on 2 ranks (ZeRO-2, CPU): an offline W&B run read back with the `wandb`
library's record format next to its JSONL twin (same keys), expert utilisation per layer, the
expert-load heatmap, a router-collapse alert, memory, step-time split and achieved FLOP/s; a
secret from the environment never reaches the logged config. (`logger=none` writing no W&B
directory is checked in test_health.py's stop run.)"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Dict, List

import pytest
from PIL import Image, ImageStat

OBSERVE = ["deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.max_steps=6",
           "trainer.log_every=2", "trainer.eval_every=3", "trainer.save_every=0",
           "trainer.save_at_end=false", "logger=wandb", "logger.project=ava-test",
           "logger.heatmap_every=2", "trainer.monitor.collapse_gini=0.01",
           "trainer.monitor.collapse_steps=1", "model.name=${oc.env:AVA_TEST_HF_TOKEN}"]
SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"


def wandb_records(path: Path) -> List:
    """The protobuf records of an offline `run-<id>.wandb` file (W&B's LevelDB-log framing:
    a 7-byte file header, 32 KiB blocks, 7-byte chunk headers `<crc32 u32, length u16, type u8>`
    with type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    return [pb.Record.FromString(c) for c in chunks]


def _key(item) -> str:
    return item.key or item.nested_key[0]  # media (a table) is flattened to [key, field]


@pytest.mark.slow
def test_offline_wandb_run_and_jsonl_twin(trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("AVA_TEST_HF_TOKEN", SECRET)
    run_dir = tmp_path / "run"
    run = trainer.run(run_dir, OBSERVE).check()

    # --- JSONL twin: every step's scalars, and the heavier metrics on log steps
    recs: Dict[int, Dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            recs[rec["step"]] = rec
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    for step, rec in recs.items():
        assert rec["perf/tokens_per_s_per_device"] == pytest.approx(rec["perf/tokens_per_s"] / 2)
        assert rec["health/skipped"] == 0 and rec["health/lr_multiplier"] == 1.0
        assert ("moe/layer0/gini" in rec) == (step % 2 == 0)
    rec = recs[4]
    assert "perf/mfu" not in rec and rec["perf/tflops_per_device"] > 0  # CPU: achieved FLOP/s
    assert rec["mem/host_rss_gb"] > 0.05 and 0 < rec["mem/host_used_fraction"] < 1
    assert sum(rec[f"perf/time_{p}_s"] for p in ("data", "forward", "backward", "health", "step")) \
        <= rec["perf/step_time_s"]
    for layer in (0, 1):  # nano: 2 MoE layers, 4 experts, top-2
        gini, ent = rec[f"moe/layer{layer}/gini"], rec[f"moe/layer{layer}/entropy"]
        assert 0 <= gini <= 0.5 and 0 < ent <= math.log(4) + 1e-6
        assert rec[f"moe/layer{layer}/max_load"] >= 1.0 and rec[f"moe/layer{layer}/dead_experts"] == 0
        assert rec[f"moe/layer{layer}/aux_loss"] > 0
    heatmap = rec["moe/load_heatmap"]
    assert len(heatmap) == 2 and all(len(row) == 4 and math.isclose(sum(row), 1.0, rel_tol=1e-5)
                                      for row in heatmap)
    alerts = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert {(a["kind"], a["layer"]) for a in alerts} == {("router_collapse", 0), ("router_collapse", 1)}
    assert "layer 1: Gini" in run.output
    assert SECRET in run.output  # the secret did reach the run (as the model name) ...

    # --- the offline W&B run holds the same keys, the heatmap table, the alerts, the config
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run_dir / "wandb").rglob("*"))
    assert SECRET.encode() not in files[0].read_bytes()  # ... but not W&B
    records = wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    wandb_keys = {_key(item) for h in history for item in h.item}
    jsonl_keys = {k for r in recs.values() for k in r} - {"step", "time"}
    assert jsonl_keys <= wandb_keys, sorted(jsonl_keys - wandb_keys)
    tables = [{item.nested_key[1]: json.loads(item.value_json) for item in h.item
               if list(item.nested_key[:1]) == ["moe/load_heatmap"]} for h in history]
    tables = [t for t in tables if t]
    assert len(tables) == 3 and all(t["_type"] == "table-file" and t["nrows"] == 2 for t in tables)
    table = json.loads((files[0].parent / "files" / tables[1]["path"]).read_text())
    assert table["columns"] == ["layer", "expert_0", "expert_1", "expert_2", "expert_3"]
    assert [row[1:] for row in table["data"]] == heatmap  # step 4, the same numbers as in JSONL
    # ... and, on the same heatmap steps, the pictures ava-report draws (W&B image media)
    for key, size in (("moe/load_heatmap_image", (700, 420)), ("moe/layer0/load_over_time", (600, 340)),
                      ("moe/layer1/load_over_time", (600, 340))):
        images = [{item.nested_key[1]: json.loads(item.value_json) for item in h.item
                   if list(item.nested_key[:1]) == [key]} for h in history]
        steps = [h.step.num for h, image in zip(history, images, strict=True) if image]
        assert steps == [2, 4, 6], (key, steps)
        image = [i for i in images if i][-1]
        assert image["_type"] == "image-file" and (image["width"], image["height"]) == size
        with Image.open(files[0].parent / "files" / image["path"]) as png:
            assert png.size == size and ImageStat.Stat(png.convert("L")).stddev[0] > 5, key
    titles = {r.alert.title for r in records if r.WhichOneof("record_type") == "alert"}
    assert titles == {"Router collapse in MoE layer 0", "Router collapse in MoE layer 1"}
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["model"]["name"] == "<redacted>"  # resolved from the environment, then redacted
    assert config["trainer"]["health"]["lr_backoff"] == 0.5
    assert "exit" in kinds


# A user's callback, added from config: it records every hook it sees (per rank) and keeps a
# count of applied steps as its checkpointed state.
HOOK_RECORDER = """
from pathlib import Path
from ava.observe import Callback

class HookRecorder(Callback):
    name = "hook_recorder"

    def __init__(self, out):
        self.out, self.applied = Path(out), 0

    def _note(self, state, hook):
        with open(self.out / f"rank{state.rank}.txt", "a") as f:
            f.write(f"{hook} {state.step}\\n")

    def on_train_start(self, state): self._note(state, f"on_train_start applied={self.applied}")
    def pre_step(self, state): self._note(state, "pre_step")
    def post_micro_batch(self, state, router_stats): self._note(state, "post_micro_batch")
    def pre_optim_step(self, state, output): self._note(state, "pre_optim_step")
    def post_step(self, state, output):
        self.applied += int(output.applied)
        self._note(state, "post_step")
    def log_metrics(self, state, metrics, step): self._note(state, "log_metrics")
    def on_event(self, state, record): self._note(state, "on_event")
    def on_eval(self, state, metrics): self._note(state, "on_eval")
    def on_step_end(self, state): self._note(state, "on_step_end")
    def post_checkpoint_saved(self, state, tag_dir): self._note(state, "post_checkpoint_saved")
    def on_train_end(self, state): self._note(state, f"on_train_end applied={self.applied}")
    def state_dict(self): return {"applied": self.applied}
    def load_state_dict(self, state): self.applied = state["applied"]
"""
STEP_HOOKS = ["pre_step", "post_micro_batch", "pre_optim_step", "post_step", "log_metrics",
              "on_step_end"]  # one micro-batch per step (smoke: grad_accum_steps=1)


def _hooks(path: Path) -> List[str]:
    lines = path.read_text().splitlines()
    path.unlink()  # the next attempt writes its own
    return lines


@pytest.mark.slow
def test_resumed_run_continues_its_offline_wandb_run_without_duplicate_steps(trainer, tmp_path,
                                                                             monkeypatch):
    """Attempt 1 logs steps 1-6 but checkpoints only step 4; attempt 2 resumes at 4, recomputes 5
    and 6 (identical, resume is exact) without re-sending them, and logs 7-8 to the same run.
    A user callback from `trainer.callbacks` sees every hook in the documented order on both
    ranks, and its state comes back from the step-4 checkpoint."""
    api_key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", api_key)  # WANDB_MODE=offline still wins
    monkeypatch.setenv("AVA_TEST_HF_TOKEN", SECRET)
    (tmp_path / "hook_recorder.py").write_text(HOOK_RECORDER)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    env = {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    run_dir = tmp_path / "run"
    common = ["deepspeed=zero2", "trainer.micro_batch_size=4", "trainer.save_every=4",
              "trainer.save_at_end=false", "trainer.eval_every=0", "trainer.decay_steps=8",
              "logger=wandb", "logger.project=ava-test", "logger.heatmap_every=0",
              "logger.report=false", "model.name=${oc.env:AVA_TEST_HF_TOKEN}",
              f"trainer.callbacks=[{{_target_: hook_recorder.HookRecorder, out: '{hooks}'}}]"]
    trainer.run(run_dir, [*common, "trainer.max_steps=6"], extra_env=env).check()
    first = [_hooks(hooks / f"rank{r}.txt") for r in (0, 1)]
    resumed = trainer.run(run_dir, [*common, "trainer.max_steps=8"], extra_env=env).check()
    second = [_hooks(hooks / f"rank{r}.txt") for r in (0, 1)]
    assert not (run_dir / "report.html").exists() and "report: " not in resumed.output

    def steps(first_step: int, last_step: int) -> List[str]:
        out = []
        for step in range(first_step, last_step + 1):
            out += [f"{h} {step - 1 if h in STEP_HOOKS[:3] else step}" for h in STEP_HOOKS]
            if step % 4 == 0:  # trainer.save_every=4
                out.append(f"post_checkpoint_saved {step}")
        return out

    assert first[0] == first[1] == ["on_train_start applied=0 0", *steps(1, 6), "on_train_end applied=6 6"]
    assert second[0] == second[1] == ["on_train_start applied=4 4", *steps(5, 8), "on_train_end applied=8 8"]
    run_id = json.loads((run_dir / "wandb_state.json").read_text())["id"]
    assert f"W&B: continuing run {run_id} after step 6" in resumed.output
    assert "2 record(s) of steps <= 6 were already logged by an earlier attempt" in resumed.output

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    steps_per_attempt = []
    for path in files:
        raw = path.read_bytes()
        assert SECRET.encode() not in raw and api_key.encode() not in raw
        records = wandb_records(path)
        assert next(r.run for r in records if r.WhichOneof("record_type") == "run").run_id == run_id
        steps_per_attempt.append([r.history.step.num for r in records
                                  if r.WhichOneof("record_type") == "history"])
    assert steps_per_attempt == [[1, 2, 3, 4, 5, 6], [7, 8]]
