"""ava-report on synthetic runs written by the real JSONL sink: the plotted series equal the
JSONL values (a rollback's repeated steps included), images decode to non-blank pictures of the
promised size, runs overlay, sweep directories are found, bad input gives one clear line."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Dict, List

import pytest
from PIL import Image, ImageStat

from ava.observe.jsonl import JsonlSink
from ava.observe.report import ReportError, expert_load_panels, write_report
from ava.observe.report.build import sections
from ava.observe.report.cli import main
from ava.observe.report.figure import DPI, HALF, HEATMAP, WIDE
from ava.observe.report.records import read_jsonl
from ava.observe.report.runs import find_runs, load_runs
from ava.observe.report.series import COLLAPSE, LR_BACKOFF, ROLLBACK, SKIPPED, incidents

LAYERS, EXPERTS, TOKENS_PER_STEP = 2, 4, 256
TRAIN_LOG = """[t][ava.train][INFO] - process group: gloo, 2 rank(s), timeout 1800s
[t][ava.data.prepare][INFO] - data validation: records read 400, kept 398, skipped 2
[t][ava.data.prepare][INFO] - data: itest: 398 documents (2 records skipped), 9000 tokens, 270 train + 10 val blocks of 32+1, 0.1s, cache /c
[t][ava.train][INFO] - model nano: 199,808 parameters (133,504 active per token), 0.00 GFLOPs/token
[t][ava.train][INFO] - DeepSpeed engine: ZeRO stage 2, fp32, optimizer DeepSpeedZeroOptimizer (torch)
[t][ava.train][INFO] - done: step 8, val loss 6.0 -> 5.5, 12.5s
"""  # noqa: E501 (train.log lines as the trainer writes them)


def _heatmap(step: int) -> List[List[float]]:
    rows = []
    for layer in range(LAYERS):
        raw = [1.0 + ((step + layer * e) % 3) for e in range(EXPERTS)]
        if layer == 1:
            raw[3] = 0.0  # a dead expert
        rows.append([v / sum(raw) for v in raw])
    return rows


def make_run(path: Path, *, lr: float = 1e-3, overrides: List[str] = (), rollback: bool = True,
             bias: bool = False) -> Path:
    """8 steps through the real JsonlSink; with `rollback`, steps 5-6 fail and are recomputed
    (logged twice, as the trainer does), with incident/rollback/alert events."""
    path.mkdir(parents=True)
    sink = JsonlSink(path / "metrics.jsonl")
    sink.log_metrics(None, {"val/loss": 6.0, "val/ppl": math.exp(6.0)}, 0)
    order = [1, 2, 3, 4, 5, 6, 5, 6, 7, 8] if rollback else list(range(1, 9))
    seen = 0
    for n, step in enumerate(order):
        seen = step * TOKENS_PER_STEP
        bad = rollback and n in (4, 5)
        metrics: Dict = {"train/loss": 6.0 - 0.1 * step + 0.01 * n, "train/lr": lr * min(step, 4) / 4,
                         "train/grad_norm": float("inf") if bad else 1.0 / step,
                         "train/tokens_seen": float(seen), "perf/tokens_per_s": 1000.0 + step,
                         "perf/tokens_per_s_per_device": (1000.0 + step) / 2,
                         "moe/dropped_fraction": 0.01 * step, "health/lr_multiplier": 0.5 if n >= 4 else 1.0}
        if step % 2 == 0:
            metrics.update({"mem/host_rss_gb": 0.5 + 0.01 * step, "perf/tflops_per_device": 0.01})
            for layer in range(LAYERS):
                metrics.update({f"moe/layer{layer}/gini": 0.1 * layer + 0.01 * step,
                                f"moe/layer{layer}/entropy": 1.3 - 0.01 * step,
                                f"moe/layer{layer}/dropped_fraction": 0.02 * layer})
                if bias:
                    metrics[f"moe/layer{layer}/expert_bias"] = [0.01 * (e - 1.5) * layer for e in range(EXPERTS)]
            metrics["moe/load_heatmap"] = _heatmap(step)
        sink.log_metrics(None, metrics, step)
        if bad:
            sink.on_event(None, {"event": "incident", "step": step, "kind": "nonfinite_grad", "value": float("inf"),
                        "z": None, "lr_multiplier": 0.5})
        if step == 4 and n == 3:
            sink.on_event(None, {"event": "alert", "kind": "router_collapse", "step": 4, "layer": 1,
                        "title": "Router collapse in MoE layer 1", "text": "step 4: layer 1: dead experts [3]"})
        if rollback and n == 5:
            sink.on_event(None, {"event": "rollback", "step": 6, "to_step": 4, "rollbacks": 1, "text": "rollback 1/3"})
    sink.log_metrics(None, {"val/loss": 5.5, "val/ppl": math.exp(5.5)}, 8)
    sink.close()
    (path / ".hydra").mkdir()
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / "train.log").write_text(TRAIN_LOG)
    (path / "status.json").write_text(json.dumps({"status": "finished", "step": 8, "exit_status": 0}))
    return path


def jsonl_last(path: Path, key: str) -> Dict[int, float]:
    """What the file says: the last value per step (the way the trainer's tests read losses)."""
    out = {}
    for line in (path / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return dict(sorted(out.items()))


def panels_by_id(run_dirs: List[Path], log_scale: bool = False) -> Dict:
    runs = load_runs(run_dirs)
    return {p.id: p for s in sections(runs, log_scale) for g in s.groups for p in g.panels}


def test_plotted_series_equal_the_jsonl_values(tmp_path):
    run = make_run(tmp_path / "run")
    panels = panels_by_id([run])
    loss = {s.label: s for s in panels["loss-step"].series}
    train = jsonl_last(run, "train/loss")
    assert list(loss["train loss"].x) == list(train) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert list(loss["train loss"].y) == list(train.values())  # the recomputed steps 5-6 win
    assert list(loss["val loss"].x) == [0, 8] and list(loss["val loss"].y) == [6.0, 5.5]
    tokens = {s.label: s for s in panels["loss-tokens"].series}
    assert list(tokens["train loss"].x) == list(jsonl_last(run, "train/tokens_seen").values())
    assert list(tokens["val loss"].x) == [0.0, 8 * TOKENS_PER_STEP]
    grad = panels["grad-norm"].series[0]
    assert list(grad.y) == [float(v) for v in jsonl_last(run, "train/grad_norm").values()]
    lr = {s.label: s for s in panels["lr"].series}
    assert list(lr["health LR multiplier"].y) == list(jsonl_last(run, "health/lr_multiplier").values())
    heat = jsonl_last(run, "moe/load_heatmap")
    assert panels["experts-heatmap"].matrix == heat[8]
    load1 = {s.label: s for s in panels["experts-load-layer1"].series}
    assert list(load1["expert 0"].x) == [2, 4, 6, 8]
    assert list(load1["expert 0"].y) == [heat[s][1][0] for s in (2, 4, 6, 8)]
    assert "expert 3 (no tokens)" in load1  # the dead expert is named in the legend
    gini = {s.label: s for s in panels["experts-gini-entropy"].series}
    assert list(gini["layer 1 gini"].y) == list(jsonl_last(run, "moe/layer1/gini").values())
    dropped = {s.label: s for s in panels["experts-dropped"].series}
    assert list(dropped["mean over layers"].y) == list(jsonl_last(run, "moe/dropped_fraction").values())
    assert "experts-bias" not in panels  # not logged: no panel


def test_images_decode_to_non_blank_pictures_of_the_promised_size(tmp_path):
    panels = panels_by_id([make_run(tmp_path / "run", bias=True)])
    sizes = {"experts-heatmap": HEATMAP, "experts-bias": HEATMAP, "experts-load-layer0": HALF,
             "experts-load-layer1": HALF}
    for pid, panel in panels.items():
        image = Image.open(io.BytesIO(panel.png))
        inches = sizes.get(pid, WIDE)
        assert image.size == (panel.width, panel.height) == (round(inches[0] * DPI), round(inches[1] * DPI)), pid
        stat = ImageStat.Stat(image.convert("L"))
        assert stat.stddev[0] > 5, f"{pid} looks blank"
    assert panels["experts-bias"].matrix[1] == pytest.approx([0.01 * (e - 1.5) for e in range(EXPERTS)])


def test_page_is_self_contained_and_holds_every_panel(tmp_path):
    run = make_run(tmp_path / "run")
    out = write_report([run])
    assert out == run / "report.html"
    page = out.read_text()
    ids = re.findall(r'<figure id="panel-([\w-]+)"', page)
    assert ids == ["loss-step", "loss-tokens", "lr", "grad-norm", "throughput", "memory",
                   "experts-heatmap", "experts-load-layer0", "experts-load-layer1",
                   "experts-gini-entropy", "experts-dropped"]
    assert page.count('src="data:image/png;base64,') == len(ids)
    assert not re.search(r"https?://|<script|<link", page)  # nothing fetched: opens offline
    for fact in ("199,808 / 133,504", "400 read, 398 kept, 2 skipped", "2 (gloo)", "12.5s",
                 "finished at step 8 (exit 0)", "2 / 1 / 1"):
        assert fact in page, fact


def test_incidents_from_events(tmp_path):
    run = make_run(tmp_path / "run")
    marks = incidents(read_jsonl(run / "events.jsonl").records)
    assert [(m.step, m.kind) for m in marks] == [(4, COLLAPSE), (5, SKIPPED), (5, LR_BACKOFF),
                                                 (6, SKIPPED), (6, LR_BACKOFF), (6, ROLLBACK)]


def test_two_runs_overlay_named_by_their_overrides(tmp_path):
    a = make_run(tmp_path / "a", lr=1e-3, overrides=["experiment=smoke", "trainer.lr=1e-3"])
    b = make_run(tmp_path / "b", lr=3e-3, overrides=["experiment=smoke", "trainer.lr=3e-3"], rollback=False)
    panels = panels_by_id([a, b])
    labels = [s.label for s in panels["loss-step"].series]
    assert labels == ["trainer.lr=1e-3: train loss", "trainer.lr=1e-3: val loss",
                      "trainer.lr=3e-3: train loss", "trainer.lr=3e-3: val loss"]
    lr = [s for s in panels["lr"].series if s.label.endswith("learning rate")]
    assert [max(s.y) for s in lr] == [1e-3, 3e-3]
    assert {"run0-experts-heatmap", "run1-experts-heatmap"} <= set(panels)
    out = write_report([a, b], out=tmp_path / "compare.html")
    assert "<h3>trainer.lr=3e-3</h3>" in out.read_text()


def test_a_sweep_directory_is_found(tmp_path):
    sweep = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for i, experts in enumerate((8, 4, 2)):
        make_run(sweep / str(i), overrides=["experiment=smoke", f"model.num_experts={experts}"])
    (sweep / "10").mkdir()  # not a run (no run files): ignored
    assert [p.name for p in find_runs([sweep])] == ["0", "1", "2"]
    out = write_report([sweep])
    assert out == sweep / "report.html"
    page = out.read_text()
    assert page.count("model.num_experts=") >= 3 and "3 runs" in page


def test_truncated_last_line_is_skipped_counted_and_reported(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().count("\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')
    read = read_jsonl(run / "metrics.jsonl")
    assert len(read.records) == lines and [(b.line, b.reason) for b in read.bad] == [
        (lines + 1, "truncated line (the run was stopped mid-write?)")]
    assert main([str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(run / "report.html")
    assert captured.err.strip() == (f"ava-report: warning: {run / 'metrics.jsonl'}: 1 unreadable line(s) "
                                    f"skipped (first: line {lines + 1}: truncated line (the run was stopped "
                                    "mid-write?))")
    page = (run / "report.html").read_text()
    assert "1 unreadable line(s) skipped" in page and f"metrics.jsonl:{lines + 1}: truncated line" in page


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "not_a_run", "no_such_dir"])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, case):
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    if case == "missing":
        (run / "train.log").write_text("")
        expected = (f"{metrics}: no such file: the run has logged nothing yet, or it ran with "
                    "logger.jsonl=false")
    elif case == "empty":
        metrics.write_text("")
        expected = f"{metrics} is empty: the run has not logged a step yet"
    elif case == "garbage":
        metrics.write_text("not json\n[1, 2]\n")
        expected = (f"{metrics} holds no readable record (2 bad line(s), the first: {metrics}:1: "
                    "not valid JSON)")
    elif case == "not_a_run":
        (run / "notes.txt").write_text("hello")
        expected = (f"{run} is not a run directory (no metrics.jsonl, train.log, .hydra/, checkpoints/ "
                    "or status.json) nor a Hydra sweep directory (multirun.yaml and numbered run directories)")
    else:
        run = tmp_path / "nope"
        expected = f"{run} does not exist"
    assert main([str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"ava-report: error: {expected}\n"
    with pytest.raises(ReportError, match=re.escape(expected)):
        write_report([run])


def test_expert_load_panels_for_wandb_media(tmp_path):
    run = make_run(tmp_path / "run")
    records = read_jsonl(run / "metrics.jsonl").records
    panels = expert_load_panels(records)
    assert [p.key for p in panels] == ["moe/load_heatmap_image", "moe/layer0/load_over_time",
                                       "moe/layer1/load_over_time"]
    assert panels[0].matrix == records[-2]["moe/load_heatmap"]  # the latest heatmap step
    one = expert_load_panels([{"step": 100, "moe/load_heatmap": _heatmap(100)}])  # a single record
    assert len(one) == 3 and list(one[1].series[0].x) == [100.0]
    assert Image.open(io.BytesIO(one[1].png)).size == (one[1].width, one[1].height)
    assert expert_load_panels([{"step": 1, "train/loss": 1.0}]) == []
