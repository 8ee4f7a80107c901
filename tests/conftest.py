"""Suite-wide settings: W&B never reaches the network and never prompts in tests."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
