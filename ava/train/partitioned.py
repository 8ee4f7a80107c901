"""ZeRO-3: the model is built already partitioned, then initialised or loaded one module at a time.

Built the plain way, every rank first holds the whole fp32 model (with `init_from`, beside the
checkpoint's tensors) until `deepspeed.initialize` partitions it. Here `deepspeed.zero.Init`
partitions each module's parameters over the ranks as soon as that module is built, and the
weights reach the partitions one module at a time: its parameters are gathered, rank 0 writes
them (it alone draws Ava's initialisation and reads the checkpoint's files), and leaving the
gather broadcasts rank 0's values and partitions them again. A rank holds its 1/N of the model
and at most one module in full (rank 0 also that module's stored tensors while it copies them).

The modules are built on the CPU in fp32 whatever the accelerator and precision, and each
module's parameters are cast to the training dtype just before DeepSpeed partitions them; the
initialisation draws on the CPU in fp32 too (`ava.model.experts.normal_`). So the random draws
are those of the plain build: the same seed gives the same weights at every ZeRO stage.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch
from torch import nn

from ava import dist
from ava.config import ModelConfig
from ava.inference.format import ExportedModel
from ava.model import AvaForCausalLM
from ava.train.init_from import plan_weights, verify_once

log = logging.getLogger("ava.train")


def build(cfg: ModelConfig, ds_config: Dict[str, Any]) -> AvaForCausalLM:
    """The model with each module's parameters partitioned as it is built, left uninitialised
    (`initialise` or `load` fill them); its buffers on this rank's device, whole."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    class CastThenPartition(deepspeed.zero.Init):
        """`zero.Init` without its tensor-constructor overrides, which would build on the
        accelerator (drawing from its generator, not the CPU's) and turn every floating tensor
        made while building into the training dtype (RoPE's float64 tables, fp32 buffers):
        only the parameters take the training dtype, each module's just before partitioning."""

        def _post_init_method(self, module: nn.Module) -> None:
            for p in module.parameters(recurse=False):
                if not is_zero_param(p) and p.is_floating_point():
                    p.data = p.data.to(self.dtype)
            super()._post_init_method(module)

    context = CastThenPartition(config_dict_or_path=ds_config, tensor_overrides=[])
    with context:
        model = AvaForCausalLM(cfg, init_weights=False)
    # the engine moves a model that zero.Init built no further: the buffers go where the
    # gathered parameters will be
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(context.local_device))
    return model


def initialise(model: AvaForCausalLM) -> None:
    """Ava's initialisation (`init_steps`, in their order) into the partitions: rank 0 draws."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    for module, step in model.init_steps():
        with GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
            if dist.rank() == 0:
                step()


def load(model: AvaForCausalLM, source: ExportedModel, expected: Dict[str, torch.Tensor],
         upcycle_noise: Optional[float], seed: int) -> None:
    """`source`'s tensors into the partitions, module by module (`expected`: the model's state
    dict as meta tensors, what the checkpoint is checked against). Rank 0 reads the files; the
    others receive through the gather's broadcast, and the buffers (`balance_bias`) through
    their own."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    verify_once(source)
    plan = plan_weights(source, expected, upcycle_noise, seed)
    rank0 = dist.rank() == 0
    with torch.no_grad(), (plan.reader() if rank0 else nullcontext()) as read:
        for name, tensors in plan.tensors.items():
            module = model.get_submodule(name)
            with GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
                if rank0:
                    for tensor_name, value in read(name).items():
                        getattr(module, tensor_name.rsplit(".", 1)[1]).copy_(value)
            buffers = dict(module.named_buffers(recurse=False))
            for tensor_name in tensors:
                leaf = tensor_name.rsplit(".", 1)[1]
                if leaf in buffers and dist.world_size() > 1:
                    torch.distributed.broadcast(buffers[leaf], src=0)


def held(model: nn.Module) -> tuple[int, int]:
    """(values this rank holds, values of the whole model) over the partitioned parameters."""
    return (sum(p.ds_tensor.numel() for p in model.parameters()),
            sum(p.ds_numel for p in model.parameters()))
