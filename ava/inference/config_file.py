"""Inference config files (YAML or JSON): model path, device map, memory, dtype, generation defaults.

Command-line values override the file; unknown keys are an error naming the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ava.inference.errors import AvaInferenceError
from ava.inference.generate import GenerationConfig
from ava.inference.loader import LoadOptions

KEYS = {"model", "prompts", *LoadOptions.__dataclass_fields__}
GEN_KEYS = set(GenerationConfig.__dataclass_fields__)


def load_inference_config(path: Optional[str], cli: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """Merge file < command line (None means 'not given'); returns `load_model` options + model."""
    data: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise AvaInferenceError(f"inference config {file} does not exist")
        try:
            data = OmegaConf.to_container(OmegaConf.load(file), resolve=True) or {}
        except Exception as err:  # YAML/JSON syntax errors carry the line in their message
            raise AvaInferenceError(f"{file}: cannot parse: {err}") from None
        unknown = sorted(set(data) - KEYS)
        if unknown:
            raise AvaInferenceError(f"{file}: unknown keys {unknown}; expected some of {sorted(KEYS)}")
        bad_gen = sorted(set(data.get("generation") or {}) - GEN_KEYS)
        if bad_gen:
            raise AvaInferenceError(f"{file}: unknown generation keys {bad_gen}; expected some of {sorted(GEN_KEYS)}")
    merged = {**data, **{k: v for k, v in cli.items() if v is not None}}
    merged["generation"] = {**(data.get("generation") or {}), **{k: v for k, v in generation.items() if v is not None}}
    if not merged.get("model"):
        raise AvaInferenceError("no model directory: pass MODEL_DIR or set `model` in --config")
    return merged
