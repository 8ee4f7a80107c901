"""Export from real 2-rank ZeRO 0/2/3 checkpoints: identical tensors, and the training model's logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ava.checkpoints import newest_intact
from ava.config import ModelConfig
from ava.export import export_checkpoint
from ava.export.consolidate import consolidate
from ava.export.exporter import locate
from ava.inference import load_model
from ava.inference.format import detect, read_tensors
from ava.model import AvaForCausalLM

STAGES = (0, 2, 3)
# A Mixtral-compatible nano model, so the same runs also feed the transformers interop test.
# The learning rate is too small to move any fp32 weight (1e-30 x O(1) Adam updates), so every
# stage's checkpoint must hold bit-identical weights: different ZeRO stages reduce gradients in
# different orders, and with a real learning rate they legitimately differ in the last bits.
# The weights still pass through each stage's partitioned fp32 master copy and optimizer state.
MIXTRAL_NANO = ["model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false",
                "trainer.max_steps=3", "trainer.save_every=0", "trainer.eval_every=0",
                "trainer.lr=1e-30", "trainer.min_lr=0"]


@pytest.fixture(scope="module")
def runs(trainer, tmp_path_factory):
    out = {}
    for stage in STAGES:
        run_dir = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        trainer.run(run_dir, [*MIXTRAL_NANO, f"deepspeed=zero{stage}"]).check()
        out[stage] = run_dir
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {stage: export_checkpoint(run, root / f"zero{stage}", layout="ava", progress=lambda _m: None)
            for stage, run in runs.items()}


@pytest.mark.slow
def test_every_stage_exports_identical_tensors(runs, exports):
    tensors = {stage: read_tensors(detect(path)) for stage, path in exports.items()}
    cfg = ModelConfig(**locate(runs[0]).client_state["config"]["model"])
    torch.manual_seed(locate(runs[0]).client_state["config"]["seed"])
    reference = AvaForCausalLM(cfg).state_dict()  # the trainer's seeded initial weights
    for stage in STAGES:
        assert tensors[stage].keys() == reference.keys()
        for name, t in reference.items():
            assert torch.equal(tensors[stage][name], t), f"ZeRO-{stage} {name} differs from the initial weights"


@pytest.mark.slow
def test_reloaded_export_reproduces_training_model_logits(runs, exports):
    src = locate(runs[2])
    cfg = ModelConfig(**src.client_state["config"]["model"])
    training_model = AvaForCausalLM(cfg).eval()
    training_model.load_state_dict(consolidate(src.ckpt_dir, src.tag))
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loaded = load_model(exports[2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, training_model(ids).logits, atol=1e-5, rtol=1e-5)
    assert loaded.generate("The river", max_new_tokens=8) is not None


@pytest.mark.slow
def test_mixtral_layout_loads_in_transformers(runs, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
    out = export_checkpoint(runs[3], tmp_path / "mixtral", layout="mixtral", progress=lambda _m: None)
    ava_model = load_model(out).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, ava_model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ava_model(ids).logits, atol=1e-4, rtol=1e-4)
    assert hf.generate(ids[:, :4], max_new_tokens=5, do_sample=False).shape == (2, 9)


@pytest.mark.slow
def test_cli_exports_newest_complete_and_reports_errors(runs, tmp_path):
    ckpt = runs[0] / "checkpoints"
    newest, _ = newest_intact(ckpt)
    out = subprocess.run([sys.executable, "-m", "ava.export.cli", str(runs[0]), str(tmp_path / "m")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "m")
    assert f"source_tag\": \"{newest.name}\"" in (tmp_path / "m" / "model.safetensors.index.json").read_text()
    bad = subprocess.run([sys.executable, "-m", "ava.export.cli", str(tmp_path / "nope"), str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"ava-export: error: {tmp_path / 'nope'} does not exist or is not a directory; "
                                  "pass a run directory or a checkpoint tag")
    again = subprocess.run([sys.executable, "-m", "ava.export.cli", str(runs[0]), str(tmp_path / "m")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr
    subprocess.run([sys.executable, "-m", "ava.export.cli", str(runs[0]), str(tmp_path / "m"), "--force"],
                   capture_output=True, text=True, check=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left
