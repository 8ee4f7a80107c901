"""bf16 on a CPU without native bf16 is allowed but announced: it is ~100x slower than fp32 there."""

import logging

from ava.train import plan


def test_bf16_on_emulating_cpu_warns_and_fp32_does_not(monkeypatch, caplog):
    monkeypatch.setattr(plan, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(plan.distributed, "accelerator_name", lambda: "cpu")
    with caplog.at_level(logging.WARNING, logger="ava.train"):
        plan.check_precision("fp32")
        assert caplog.records == []
        plan.check_precision("bf16")
    assert "bf16 matmuls run ~100x slower than fp32 here; consider trainer.precision=fp32" in caplog.text

