"""The DeepSeek-shaped preset (a dense first layer, a shared expert, sigmoid routing scaled,
auxiliary-loss-free expert bias, the sequence-wise balance loss) on 2 ranks under ZeRO-3, where
parameters are partitioned but the expert bias is a buffer every rank keeps: it trains, resumes
exactly (the bias bit for bit) and exports to a directory `ava.inference` loads with the same
bias. (ZeRO-2 and expert parallelism with these options: test_expert_parallel.py's `sharded`.)"""

from __future__ import annotations

import pytest
import torch

from ava.export import export_checkpoint
from ava.inference import load_model
from ava.inference.format import detect, read_tensors

# mini_deepseek's shape at test width (its own sizes are for the CPU demo, not a test)
DEEPSEEK = ["model=mini_deepseek", "model.hidden_size=64", "model.vocab_size=512", "model.max_seq_len=64",
            "model.ffn_size=32", "model.dense_ffn_size=128", "model.num_experts=8", "model.num_heads=4",
            "model.bias_update_rate=0.01", "deepspeed=zero3", "trainer.micro_batch_size=4",
            "trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=0", "trainer.warmup_steps=1"]


def _state(run_dir, step: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    # our own test artifact, written by DeepSpeed with pickled extras: not untrusted input
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.slow
def test_deepseek_shape_under_zero3_resumes_exactly_and_exports_its_bias(trainer, tmp_path):
    full = trainer.run(tmp_path / "full", DEEPSEEK).check()
    losses = full.losses()
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    tag = full.run_dir / "checkpoints" / "step_00000003"
    resumed = trainer.run(tmp_path / "resumed", [*DEEPSEEK, f"trainer.resume='{tag}'"]).check()
    assert resumed.losses() == {s: v for s, v in losses.items() if s > 3}

    biases = [{n: t for n, t in _state(r.run_dir, 6).items() if n.endswith("balance_bias")} for r in (full, resumed)]
    assert sorted(biases[0]) == [f"layers.{i}.moe.router.balance_bias" for i in (1, 2, 3)]  # layer 0 is dense
    assert all(torch.equal(biases[0][n], biases[1][n]) and float(biases[0][n].abs().max()) > 0 for n in biases[0])
    logged = [r for r in full.metrics() if r["step"] == 6 and "moe/layer3/expert_bias" in r]
    last = biases[0]["layers.3.moe.router.balance_bias"]
    assert torch.equal(torch.tensor(logged[-1]["moe/layer3/expert_bias"]), last)  # what the report draws

    page = (full.run_dir / "report.html").read_text()  # panels named by the model's layers (0 is dense)
    assert [f"experts-load-layer{i}" in page for i in range(4)] == [False, True, True, True]
    assert 'id="panel-experts-bias"' in page

    out = export_checkpoint(full.run_dir, tmp_path / "export", layout="auto", progress=lambda _m: None)
    tensors = read_tensors(detect(out))
    assert all(torch.equal(tensors[n], biases[0][n]) for n in biases[0])
    model = load_model(out).model
    assert model.layers[0].moe is None and model.layers[1].moe.shared is not None
    assert torch.equal(model.layers[3].moe.router.balance_bias, biases[0]["layers.3.moe.router.balance_bias"])
