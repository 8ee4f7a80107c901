"""One error hierarchy for loading and generation: each message says what happened and what to try."""


class AvaInferenceError(Exception):
    """Base class: catch this to handle every loading or generation failure."""


class CheckpointFormatError(AvaInferenceError):
    """The directory is not a complete, intact Ava export (missing, corrupt or mismatched files)."""


class UnsupportedDtypeError(AvaInferenceError):
    """The stored dtype cannot run on the chosen device; no silent cast is made."""


class InsufficientMemoryError(AvaInferenceError):
    """The device plan cannot hold the model (and its KV cache) in the memory allowed."""


class GenerationError(AvaInferenceError):
    """Generation was asked for something it cannot do (an empty prompt, a bad setting)."""
