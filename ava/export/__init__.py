"""DeepSpeed checkpoint → Hugging Face-style model directory (Ava or Mixtral layout)."""

from ava.export.exporter import ExportError, TrainingInfo, export_checkpoint, export_state_dict

__all__ = ["ExportError", "TrainingInfo", "export_checkpoint", "export_state_dict"]
