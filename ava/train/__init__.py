"""Training: the Hydra entry point (`cli`), DeepSpeed config and engine, the loop, the LR
schedule, checkpoints + resume, graceful stop, and the run directory all ranks agree on.

Only the entry point imports this package; nothing else in Ava does.
"""
