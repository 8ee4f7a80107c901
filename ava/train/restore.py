"""One way back to a checkpoint, for resume and for rollback.

`restore(run, tag_dir, resume=True)` continues a run exactly: model, optimizer and LR position
(DeepSpeed), step and tokens, validation losses, every callback's state (gradient health
included), and per rank the loader position and the RNG states. A rollback
(`resume=False`) takes the parameters, optimizer and position only: the health statistics,
the loader (the data consumed since is skipped, not replayed) and the RNG streams go on.
`build_run` checks the checkpoint it resumes before it builds the engine (`check_layout`,
`check_data`): one the run cannot continue exactly is refused, unless `trainer.elastic=true`
planned a reshard onto this world size or expert-parallel split (ava/train/elastic.py). Then the
tag is loaded through DeepSpeed's universal checkpoint, the router buffers (the expert bias) are
copied from its module state, every rank's experts are checked against the saved ones, and on
another world size the loader is mapped by samples consumed and the RNG streams are re-seeded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch

from ava.checkpoints import read_manifest
from ava.config import AvaConfig, ConfigError
from ava.train.checkpoint import rank_state_name, restore_rng
from ava.train.checkpointing import callback_states
from ava.train.ds_compat import universal_loading
from ava.train.elastic import Reshard, reseed, to_universal
from ava.train.expert_reshard import check_placement

if TYPE_CHECKING:
    from ava.train.plan import TrainPlan
    from ava.train.run import Run

log = logging.getLogger("ava.train")


def _optimizer_layout(stage: int) -> str:
    """DeepSpeed's optimizer checkpoint format for a ZeRO stage: stages 1 and 2 share one."""
    return {0: "unpartitioned", 1: "zero-1/2", 2: "zero-1/2"}.get(stage, "zero-3")


def check_layout(cfg: AvaConfig, plan: TrainPlan, tag_dir: Path, reshard: Optional[Reshard]) -> None:
    """Refuse another world size (ZeRO partitions, loader shards and RNG streams are per rank) or
    another expert-parallel split unless `reshard` (trainer.elastic) covers them, and another
    ZeRO stage always. Runs before the engine is built."""
    manifest = read_manifest(tag_dir)
    world = plan.world_size
    saved_world = manifest.get("world_size")
    elastic = ("set trainer.elastic=true to reshard it (DeepSpeed universal checkpoint), or export the checkpoint "
               "with ava-export and start a new run directory")
    if saved_world is not None and int(saved_world) != world and reshard is None:
        raise ConfigError(
            f"checkpoint {tag_dir} was saved by {saved_world} rank(s) and this run has "
            f"{world}: resuming needs the same world size (ZeRO shards, loader "
            f"positions and RNG streams are per rank). Relaunch with {saved_world} rank(s), {elastic}")
    saved_ep, ep = int(manifest.get("expert_parallel_size", 1)), cfg.trainer.expert_parallel_size
    if saved_ep != ep and reshard is None:
        raise ConfigError(
            f"checkpoint {tag_dir} was saved with trainer.expert_parallel_size={saved_ep} and this run "
            f"has {ep}: each rank's experts and optimizer shards follow that split. Relaunch with "
            f"trainer.expert_parallel_size={saved_ep}, {elastic}")
    saved_stage, stage = manifest.get("zero_stage"), plan.zero_stage
    if saved_stage is not None and _optimizer_layout(int(saved_stage)) != _optimizer_layout(stage):
        raise ConfigError(
            f"checkpoint {tag_dir} was saved under ZeRO stage {saved_stage} and this run uses stage {stage}: "
            "DeepSpeed writes the optimizer state of stage 0, stages 1-2 and stage 3 in different layouts, and "
            f"Ava's resume does not convert between them. Relaunch with deepspeed=zero{saved_stage}, or export the "
            "checkpoint with ava-export and start a new run directory")


def check_data(cfg: AvaConfig, fingerprint: str, tag_dir: Path) -> bool:
    """Refuse other data (the loader position would point into a different token stream) unless
    `trainer.allow_data_change`; returns whether the data changed (and that was allowed)."""
    saved_data = read_manifest(tag_dir).get("data_fingerprint")
    changed = saved_data is not None and saved_data != fingerprint
    if changed and not cfg.trainer.allow_data_change:
        raise ConfigError(
            f"checkpoint {tag_dir} was trained on data with fingerprint {saved_data}, but "
            f"the configured data has fingerprint {fingerprint} (data.sources, "
            "tokenizer or packing settings changed): the saved loader position would point "
            "into other data. Restore the original data, or set "
            "trainer.allow_data_change=true to continue on the new data anyway")
    if changed:
        log.warning("the data changed since checkpoint %s (fingerprint %s -> %s); "
                    "continuing (trainer.allow_data_change=true)", tag_dir.name, saved_data, fingerprint)
    return changed


def restore_buffers(module: Any, universal_tag: Path) -> None:
    """DeepSpeed's universal load restores parameters from `zero/` and skips the module state, so
    persistent buffers (the routers' expert bias) come from the converted tag's module state."""
    files = sorted(p for p in universal_tag.glob("*mp_rank_00_model_states.pt") if not p.name.startswith("layer_"))
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]  # DeepSpeed's pickle, as resume
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def _load_resharded(run: Run, reshard: Reshard, tag_dir: Path) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    groups = [{k: v for k, v in group.items() if k != "params"}  # the torch optimizer's, inside ZeRO's
              for group in run.engine.optimizer.optimizer.param_groups]
    universal = to_universal(reshard, run.plan.expert_parallel, run.cfg.model.num_experts, groups)
    with universal_loading(run.engine, universal):
        # on another world size every rank continues the global order from rank 0's position
        loaded = run.checkpoints.load(run.engine, universal, rank_state_from=tag_dir,
                                      rank=0 if reshard.world_changed else None)
    restore_buffers(run.engine.module, universal)
    if reshard.moves_experts:
        log.info("%s", check_placement(run.engine.module, universal / "zero", run.cfg.model.num_experts))
    return loaded


def restore(run: Run, tag_dir: Path, *, resume: bool) -> int:
    """Load `tag_dir` into `run` (see the module docstring); returns its step."""
    state = run.state
    resumed = resume and tag_dir == run.resume_from  # what build_run checked (and maybe planned to reshard)
    reshard = run.reshard if resumed else None
    if reshard is None:
        client, rank_state = run.checkpoints.load(run.engine, tag_dir)
    else:
        client, rank_state = _load_resharded(run, reshard, tag_dir)
    data_changed = run.data_changed if resumed else False
    exact = reshard is None or not reshard.world_changed  # per-rank state maps one to one
    state.step = int(client["step"])
    state.tokens_seen = int(client.get("tokens_seen", state.tokens_seen))
    state.last_saved = state.step
    if resume:
        vals = client.get("val_losses") or {}
        state.first_val_loss, state.last_val_loss = vals.get("first"), vals.get("last")
        if rank_state is None:
            raise ConfigError(f"checkpoint {tag_dir} has no {rank_state_name(state.rank)} for "
                              f"rank {state.rank}: it was not written by an Ava run of this shape")
        if data_changed:
            log.warning("the loader starts the new data from its beginning")
        else:
            try:
                run.loader.load_state_dict(rank_state["loader"], strict=exact)
            except ValueError as exc:
                raise ConfigError(f"checkpoint {tag_dir}: {exc}") from exc
        if exact:
            restore_rng(rank_state["rng"])
        else:
            reseed(run.cfg.seed, state.step, state.rank)
        run.callbacks.load_state_dict(callback_states(client))
    # DeepSpeed restored the schedule's position; the multiplier is the health monitor's
    run.schedule.set_multiplier(run.health.monitor.lr_multiplier)
    return state.step


def resume(run: Run) -> None:
    """`trainer.resume`: auto (the newest intact checkpoint, if any), never, or a tag/path."""
    tag_dir = run.resume_from
    if tag_dir is None:
        if run.cfg.trainer.resume == "auto":
            log.info("no complete checkpoint in %s: starting from step 0", run.checkpoints.dir)
        return
    restore(run, tag_dir, resume=True)
    log.info("resuming from %s at step %d", tag_dir.name, run.state.step)


def rollback(run: Run, step_no: int) -> None:
    """Back to the newest complete checkpoint saved before the incident streak began; the
    loader keeps its position, so the data consumed since that checkpoint is skipped."""
    health_cfg = run.cfg.trainer.health
    first_bad = run.health.rollback_started()
    tag_dir = run.checkpoints.resolve_before(first_bad - 1)
    monitor = run.health.monitor
    head = (f"rollback {monitor.rollbacks}/{health_cfg.max_rollbacks}: "
            f"{health_cfg.rollback_after} consecutive unhealthy steps")
    if tag_dir is None:
        text = (f"{head} (from step {first_bad}) but no complete checkpoint at or before step "
                f"{first_bad - 1}: parameters are unchanged (the steps were skipped); "
                "continuing with fresh data")
        to_step = run.state.step
        run.schedule.set_multiplier(monitor.lr_multiplier)
    else:
        to_step = restore(run, tag_dir, resume=False)
        text = (f"{head} (steps {first_bad}-{step_no}); restored {tag_dir.name} (step {to_step}), "
                f"skipping the data of the {step_no - to_step} steps since; "
                f"LR multiplier {monitor.lr_multiplier:.3g}")
    run.callbacks.on_event(run.state, {"event": "rollback", "step": step_no, "to_step": to_step,
                                       "rollbacks": monitor.rollbacks, "title": "Rollback", "text": text})
