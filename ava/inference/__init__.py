"""Load `ava-export` directories anywhere and generate; one API for the CLI, Python and plugins."""

from ava.inference.errors import (
    AvaInferenceError,
    CheckpointFormatError,
    GenerationError,
    InsufficientMemoryError,
    UnsupportedDtypeError,
)
from ava.inference.generate import GenerationConfig
from ava.inference.loader import LoadedModel, load_model

__all__ = [
    "AvaInferenceError", "CheckpointFormatError", "GenerationConfig", "GenerationError", "InsufficientMemoryError",
    "LoadedModel", "UnsupportedDtypeError", "load_model",
]
