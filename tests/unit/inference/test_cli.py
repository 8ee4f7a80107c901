"""`ava-generate`: a config file with command-line overrides, streaming output, clear errors."""

from __future__ import annotations

import pytest

from ava.inference.cli import main
from ava.inference.config_file import load_inference_config
from ava.inference.errors import AvaInferenceError


def test_config_file_values_are_overridden_by_flags(ava_export, tmp_path, capsys):
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(f"model: {ava_export[0]}\ndevice_map: cpu\ngeneration:\n  max_new_tokens: 3\n  seed: 1\n")
    merged = load_inference_config(str(cfg), {"model": None, "dtype": "fp32"}, {"max_new_tokens": 5})
    assert merged["model"] == str(ava_export[0]) and merged["dtype"] == "fp32"
    assert merged["generation"] == {"max_new_tokens": 5, "seed": 1}
    assert main(["--config", str(cfg), "--prompt", "The quick", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The quick") and out.endswith("\n")


def test_unknown_config_keys_are_named(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: x\ndevise_map: cpu\ngeneration: {max_tokens: 3}\n")
    with pytest.raises(AvaInferenceError, match=r"bad\.yaml: unknown keys \['devise_map'\]"):
        load_inference_config(str(cfg), {}, {})


def test_cli_reports_errors_without_traceback(ava_export, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "CheckpointFormatError" in err and "is not a directory" in err and "Traceback" not in err
    assert main([str(ava_export[0])]) == 2
    assert "no prompt: pass --prompt TEXT" in capsys.readouterr().err
