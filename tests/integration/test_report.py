"""`ava-report` on a real 2-rank run (ZeRO-2, CPU) with an injected incident: the page holds
every panel, each image decodes to a non-blank picture of its stated size, the plotted series
equal the JSONL values, and the summary names what the run's own files say."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import pytest
from PIL import Image, ImageStat

from .conftest import REPO

RUN = ["trainer.max_steps=6", "trainer.log_every=2", "logger.heatmap_every=2", "trainer.eval_every=3",
       "trainer.save_every=0", "trainer.save_at_end=false", "trainer.health.inject.kind=nan_grad",
       "trainer.health.inject.steps=[3]"]
PANELS = ["loss-step", "loss-tokens", "lr", "grad-norm", "throughput", "memory", "experts-heatmap",
          "experts-load-layer0", "experts-load-layer1", "experts-gini-entropy", "experts-dropped"]


@pytest.mark.slow
def test_report_of_a_two_rank_run_holds_every_panel(trainer, tmp_path):
    run_dir = tmp_path / "run"
    run = trainer.run(run_dir, RUN).check()
    out = run_dir / "report.html"
    # training ended by writing the page (rank 0) and naming it beside the run directory
    lines = run.output.splitlines()
    at = next(i for i, line in enumerate(lines) if f"run directory: {run_dir} " in line)
    assert f"report: {out} (open it in a browser; `ava-report {run_dir}` redraws it)" in lines[at + 1]
    assert run.output.count("report: ") == 1 and out.read_text().startswith("<!DOCTYPE html>")
    out.unlink()
    proc = subprocess.run([sys.executable, "-m", "ava.observe.report.cli", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and proc.stderr == ""
    page = out.read_text()
    figures = re.findall(r'<figure id="panel-([\w-]+)" data-panel="[\w-]+"><img alt="[^"]*" width="(\d+)" '
                         r'height="(\d+)" src="data:image/png;base64,([^"]+)"', page)
    assert [f[0] for f in figures] == PANELS
    for pid, width, height, data in figures:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.size == (int(width), int(height)), pid
        assert ImageStat.Stat(image.convert("L")).stddev[0] > 5, f"{pid} looks blank"
    for fact in ("2 (gloo)", "<td>2</td>", "incidents / rollbacks / alerts", "finished at step 6"):
        assert fact in page, fact

    # the data the figures were drawn from equals the JSONL
    from ava.observe.report.build import sections
    from ava.observe.report.runs import load_runs

    panels = {p.id: p for s in sections(load_runs([run_dir]), False) for g in s.groups for p in g.panels}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    loss = {s.label: s for s in panels["loss-step"].series}
    assert dict(zip(loss["train loss"].x, loss["train loss"].y, strict=True)) == train
    assert list(loss["val loss"].x) == [r["step"] for r in records if "val/loss" in r]
    heat = [r["moe/load_heatmap"] for r in records if "moe/load_heatmap" in r]
    assert panels["experts-heatmap"].matrix == heat[-1] and len(heat) == 3
    assert list(panels["experts-load-layer1"].series[0].y) == [h[1][0] for h in heat]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "incident"] == [3]
