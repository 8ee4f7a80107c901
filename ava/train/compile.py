"""`trainer.compile`: `torch.compile` each transformer block, the way torchtitan compiles per layer.

Per block rather than the whole model: the blocks are one class, so dynamo traces the first and
the others reuse its graphs (4 graphs for nano, 2 or 10 layers alike), and what surrounds them
(the embedding, the chunked LM head + loss) stays eager Python. Inside a block everything is
compiled (norms, attention, router, capacity, balance losses, shared/dense FFNs) except two
things the model marks `torch.compiler.disable`: the token dispatch and the experts themselves
(`ava.model.moe.dispatch_combine`: the loop backend's per-expert counts are Python ints that a
trace would be specialised on, a recompilation at almost every routing decision, and the grouped
kernel's shape function admits bf16 only), and the hand-over of the routing statistics to the
model's collector (`MoELayer.report`: traced, it would be guarded on the layer's index). So one
step runs a fixed set of graphs whatever the routing and the depth.

Only the block's `forward` is compiled, in place (parameter names, `isinstance` and checkpoints
unchanged), not its `__call__`: module hooks such as DeepSpeed ZeRO-3's parameter gathering run
eagerly around it. Under ZeRO-3 the blocks are also made leaf modules, so that no hooks fire
inside a block (`zero3_leaf_blocks`). Activation checkpointing (`model.activation_checkpointing`)
wraps the compiled block: its recomputation replays the same graphs.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Optional

import torch
from torch import nn

from ava.observe.callbacks import Callback, StepOutput, TrainState

log = logging.getLogger("ava.train")

BACKEND = "inductor"  # torch.compile's default, and what runs on CPU and GPU alike


def compile_blocks(model: nn.Module, *, backend: str = BACKEND, mode: Optional[str] = None) -> int:
    """Compile the `forward` of each of `model.layers` in place (an `AvaForCausalLM`, the engine's
    module, or any model whose `layers` are its blocks, such as `transformers`' `MixtralModel`);
    returns the number of blocks compiled. Compilation itself happens on the first call. A block
    compiled already is left as it is (not counted)."""
    compiled = 0
    for block in model.layers:
        if "forward" in vars(block):  # an instance attribute: compiled by an earlier call
            continue
        block.forward = torch.compile(block.forward, backend=backend, mode=mode)
        compiled += 1
    return compiled


def zero3_leaf_blocks(model: nn.Module) -> int:
    """Make each block a ZeRO-3 leaf module (before `deepspeed.initialize`): DeepSpeed then gathers
    a block's parameters in the block's own hooks, outside the compiled forward, instead of in
    hooks on every submodule, which would each break the compiled graph."""
    from deepspeed.utils import set_z3_leaf_modules

    return len(set_z3_leaf_modules(model, [type(block) for block in model.layers]))


def graphs_compiled() -> int:
    """Graphs dynamo has traced in this process so far, every compiled region included (the
    backward graphs AOT autograd derives from them are not counted apart)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch(Callback):
    """Logs the first training step's time once (it includes compiling the blocks' forward and
    backward graphs) and warns when a later training step compiled anything: a recompilation,
    which should not happen step after step. The summary estimates the compile time as the first
    step's time less the median of the later ones."""

    name = "compile"

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.first_step_s: Optional[float] = None
        self.later_steps_s: list[float] = []
        self.recompiled_steps: list[int] = []
        self._graphs = 0
        self._start = 0.0
        self._at_start = 0

    def on_train_start(self, state: TrainState) -> None:
        self._at_start = graphs_compiled()

    def pre_step(self, state: TrainState) -> None:
        self._graphs, self._start = graphs_compiled(), time.perf_counter()

    def post_step(self, state: TrainState, output: StepOutput) -> None:
        seconds, new = time.perf_counter() - self._start, graphs_compiled() - self._graphs
        if self.first_step_s is None:
            self.first_step_s = seconds
            before = self._graphs - self._at_start  # eval mode (`trainer.eval_at_start`) has its own graphs
            if state.rank == 0:
                log.info("torch.compile: the first training step took %.1fs, including compiling %d "
                         "graphs for %d blocks%s", seconds, new, self.blocks,
                         f" (and {before} for the evaluation before it)" if before else "")
            return
        if len(self.later_steps_s) < 100:  # the median of the first hundred is estimate enough
            self.later_steps_s.append(seconds)
        if new:
            self.recompiled_steps.append(state.step)
            log.warning("torch.compile: step %d compiled %d new graphs (a recompilation: an input's "
                        "shape, dtype or a guarded value changed; TORCH_LOGS=recompiles says which)",
                        state.step, new)

    def summary(self) -> str:
        if self.first_step_s is None:
            return ""
        text = f"torch.compile: {self.blocks} blocks; first step {self.first_step_s:.1f}s"
        if self.later_steps_s:
            warm = statistics.median(self.later_steps_s)
            text += f" vs {warm:.2f}s later (median): ~{self.first_step_s - warm:.1f}s compiling"
        recompiled = len(self.recompiled_steps)
        return text + (f"; {recompiled} later steps recompiled" if recompiled else "; no recompilation after it")
