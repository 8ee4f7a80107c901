"""Everything a training run needs, built once by `build_run` into a typed `Run`.

Order: data (rank 0 prepares, every rank maps the cache), the model (same seed on every rank,
then per-rank streams), the DeepSpeed engine, the loader, the callbacks, resume, the sinks (they
need the step the run resumed at). `ava.train.loop.fit(run)` then only sequences steps and hooks.

Callbacks, in hook order: gradient health, experts, throughput, memory, the user's
(`trainer.callbacks` from config, then `callbacks=` from Python), checkpointing, and on rank 0 the
sinks (console, JSONL, W&B).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

from ava import dist
from ava.checkpoints import RUN_CHAT_TEMPLATE
from ava.config import AvaConfig, ConfigError
from ava.data import BlockLoader, PreparedData, prepare_data
from ava.files import atomic_write
from ava.model import AvaForCausalLM
from ava.observe import Callback, CallbackList, TrainState, build_sinks
from ava.observe.experts import ExpertMonitor
from ava.observe.memory import MemoryMonitor, peak_rss
from ava.observe.throughput import StepTimer, ThroughputMonitor, device_peak_tflops
from ava.train import partitioned
from ava.train.checkpoint import CheckpointManager, seed_everything
from ava.train.checkpointing import Checkpointing, save_checkpoint
from ava.train.compile import CompileWatch, compile_blocks, zero3_leaf_blocks
from ava.train.elastic import Reshard, adapted, plan_reshard
from ava.train.engine import build_engine
from ava.train.evaluate import Evaluator
from ava.train.expert_bias import expert_bias_callback
from ava.train.faults import FaultInjector
from ava.train.health_callback import HealthCallback
from ava.train.host_memory import HostMemoryTrim
from ava.train.init_from import load_weights, open_source
from ava.train.plan import TrainPlan, make_plan
from ava.train.restore import check_data, check_layout, resume
from ava.train.schedule import Schedule
from ava.train.signals import StopRequest

log = logging.getLogger("ava.train")


@dataclass
class Run:
    cfg: AvaConfig
    run_dir: Path
    plan: TrainPlan
    data: PreparedData
    engine: Any  # deepspeed.DeepSpeedEngine
    schedule: Schedule  # the engine's LR scheduler
    loader: BlockLoader
    evaluate: Evaluator
    checkpoints: CheckpointManager
    faults: FaultInjector
    health: HealthCallback
    callbacks: CallbackList
    state: TrainState
    timer: StepTimer
    resolved_config: Dict[str, Any]
    stop: Optional[StopRequest]  # the caller's signal handler (covers setup too), else fit's own
    resume_from: Optional[Path] = None  # the tag `trainer.resume` resolved to; None: start at step 0
    reshard: Optional[Reshard] = None  # an elastic resume onto another world size or split (ava/train/elastic.py)
    data_changed: bool = False  # resume_from was trained on other data (trainer.allow_data_change)


def _instantiate_reason(exc: Exception) -> str:
    """The user's mistake in one line, from under Hydra's wrapper (which names no reason)."""
    cause = exc.__cause__
    if cause is None:
        return (str(exc).splitlines() or [type(exc).__name__])[0]
    lines = str(cause).splitlines() or [""]
    if isinstance(cause, ImportError) and len(lines) > 1:  # "Error loading 'x':", then why
        return lines[1]
    return f"{type(cause).__name__}: {lines[0]}"


def config_callbacks(specs: List[Any]) -> List[Callback]:
    """`trainer.callbacks`: Hydra `_target_` specs, each instantiated and checked."""
    from hydra.utils import instantiate

    built = []
    for i, spec in enumerate(specs):
        key = f"trainer.callbacks[{i}]"
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise ConfigError(f"{key} must be a mapping with _target_: module.ClassName (got {spec!r})")
        try:
            callback = instantiate(spec)
        except Exception as exc:  # Hydra wraps import and constructor errors
            raise ConfigError(f"{key}: cannot instantiate {spec['_target_']}: "
                              f"{_instantiate_reason(exc)}") from exc
        if not isinstance(callback, Callback):
            raise ConfigError(f"{key}: {spec['_target_']} is a {type(callback).__name__}, "
                              "not an ava.observe.Callback")
        built.append(callback)
    return built


def _timer(device: torch.device, sync_timing: bool) -> StepTimer:
    if device.type != "cpu" and sync_timing:
        from deepspeed.accelerator import get_accelerator

        return StepTimer(get_accelerator().synchronize)
    return StepTimer()


def build_model(cfg: AvaConfig, plan: TrainPlan) -> torch.nn.Module:
    """The model with its initial weights: seeded (the same on every rank) or `init_from`'s.
    ZeRO-3: built partitioned and filled module by module (`ava.train.partitioned`); ZeRO 0-2:
    whole on every rank, which DeepSpeed then partitions as the stage says."""
    seed_everything(cfg.seed)  # identical initial weights on every rank
    source = open_source(cfg.init_from) if cfg.init_from else None
    noise = cfg.upcycle.noise if cfg.upcycle.num_experts else None
    initialise = source is None or noise is not None  # else the checkpoint writes every weight
    if plan.zero_stage == 3:
        model = partitioned.build(cfg.model, plan.ds_config)
        if initialise:
            partitioned.initialise(model)
        if source is not None:
            with torch.device("meta"):
                expected = AvaForCausalLM(cfg.model, init_weights=False).state_dict()
            partitioned.load(model, source, expected, noise, cfg.seed)
        values, total = partitioned.held(model)
        where = f"into the ZeRO-3 partitions, module by module (this rank holds {values:,} of {total:,} values)"
    else:
        model = AvaForCausalLM(cfg.model, init_weights=initialise)
        if source is not None:
            load_weights(model, source, noise, seed=cfg.seed)
        where = "whole on every rank"
    if source is not None:
        log.info("init_from: weights of %s (%s) loaded before step 0, %s (host peak RSS so far %.2f GiB)",
                 source.path, source.layout, where, peak_rss() / 2**30)
    elif plan.zero_stage == 3:
        log.info("model initialised %s (host peak RSS so far %.2f GiB)", where, peak_rss() / 2**30)
    return model


def build_run(cfg: AvaConfig, run_dir: Path, *, plan: Optional[TrainPlan] = None,
              resolved_config: Optional[Dict[str, Any]] = None, callbacks: Iterable[Callback] = (),
              stop: Optional[StopRequest] = None) -> Run:
    t, rank = cfg.trainer, dist.rank()
    run_dir = Path(run_dir)
    checkpoints = CheckpointManager(run_dir / "checkpoints", t.keep_last, verify_hashes=t.verify_checkpoints)
    resume_from = checkpoints.resolve(t.resume)  # once: it verifies the checkpoint's hashes
    reshard = plan_reshard(cfg, resume_from, dist.world_size())
    if reshard is not None:  # before the engine: DeepSpeed's batch settings follow the new layout
        log.info("%s", reshard.describe())
        cfg = adapted(cfg, reshard)
        t = cfg.trainer
        plan = make_plan(t, cfg.deepspeed, cfg.model, dist.world_size())  # a given plan had the old accumulation
        if resolved_config and isinstance(resolved_config.get("trainer"), dict):
            resolved_config["trainer"].update(grad_accum_steps=reshard.accum, global_batch_size=None)
    plan = plan or make_plan(t, cfg.deepspeed, cfg.model, dist.world_size())
    if resume_from is not None:  # a refused resume stops before the data and the engine
        check_layout(cfg, plan, resume_from, reshard)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    user_callbacks = config_callbacks(list(t.callbacks)) + list(callbacks)  # fail before the work

    data = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size, seed=cfg.seed)
    data_changed = resume_from is not None and check_data(cfg, data.fingerprint, resume_from)
    if rank == 0:  # the run directory is self-contained: ava-export reads it from here
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "tokenizer.json", lambda tmp: shutil.copyfile(data.tokenizer_path, tmp))
        if data.chat_template_path is not None:  # the export hands it on with the tokenizer
            atomic_write(run_dir / RUN_CHAT_TEMPLATE, lambda tmp: shutil.copyfile(data.chat_template_path, tmp))
    model = build_model(cfg, plan)
    seq_len = cfg.data.seq_len
    with torch.device("meta"):  # shapes only: under ZeRO-3 the model itself holds only partitions
        shapes = AvaForCausalLM(cfg.model, init_weights=False)
    flops_per_token = float(shapes.flops_per_token(seq_len))
    log.info("model %s: %s parameters (%s active per token), %.2f GFLOPs/token", cfg.model.name,
             f"{shapes.num_parameters():,}", f"{shapes.num_parameters(active_only=True):,}",
             flops_per_token / 1e9)
    seed_everything(cfg.seed + rank)  # independent streams per rank from here on
    if plan.compile:  # before the engine: ZeRO-3 registers its hooks by the leaf flags
        if plan.zero_stage == 3:
            zero3_leaf_blocks(model)
        log.info("trainer.compile: %d transformer blocks compiled with torch.compile on their first "
                 "call (the experts' dispatch stays eager)", compile_blocks(model))
    engine = build_engine(model, t, plan)
    faults = FaultInjector(t.health.inject, rank)
    faults.attach(engine.module)
    health = HealthCallback(t.health, engine, engine.lr_scheduler, faults)
    state = TrainState(max_steps=t.max_steps, rank=rank, world_size=plan.world_size, run_dir=run_dir)
    m = t.monitor
    own: List[Callback] = [
        health,
        ExpertMonitor(num_layers=len(cfg.model.moe_layers), layer_ids=cfg.model.moe_layers,
                      num_experts=cfg.model.num_experts,
                      top_k=cfg.model.top_k, log_every=t.log_every, heatmap_every=cfg.logger.heatmap_every,
                      dead_expert_steps=m.dead_expert_steps, collapse_gini=m.collapse_gini,
                      collapse_steps=m.collapse_steps, device=engine.device),
        ThroughputMonitor(plan.tokens_per_step(seq_len), flops_per_token,
                          device_peak_tflops(engine.device, m.peak_tflops)),
        HostMemoryTrim(t.trim_host_memory_every),  # first: the monitor then reads what the step keeps
        MemoryMonitor(m.memory_warn_fraction, engine.device),
    ]
    if plan.compile:
        own.append(CompileWatch(len(model.layers)))
    if cfg.model.expert_bias:
        own.append(expert_bias_callback(engine.module, cfg.model.moe_layers, cfg.model.bias_update_rate,
                                        engine.device))
    run = Run(cfg=cfg, run_dir=run_dir, plan=plan, data=data, engine=engine,
              schedule=engine.lr_scheduler,
              loader=BlockLoader(data.train, micro_batch_size=plan.micro, rank=rank,
                                 world_size=plan.world_size, seed=cfg.seed,
                                 document_mask=cfg.data.document_mask, accum=plan.accum),
              evaluate=Evaluator(data.val, micro_batch_size=plan.micro, batches=t.eval_batches, seed=cfg.seed,
                                 document_mask=cfg.data.document_mask),
              checkpoints=checkpoints,
              faults=faults, health=health, callbacks=CallbackList(), state=state,
              timer=_timer(engine.device, m.sync_timing), resolved_config=resolved_config or {},
              stop=stop, resume_from=resume_from, reshard=reshard, data_changed=data_changed)
    checkpointing = Checkpointing(lambda: save_checkpoint(run), save_every=t.save_every,
                                  save_at_end=t.save_at_end)
    run.callbacks = CallbackList([*own, *user_callbacks, checkpointing])
    resume(run)
    log.info("training: %d steps x %d tokens (micro %d x accum %d x world %d x seq %d); run dir %s",
             t.max_steps, plan.tokens_per_step(seq_len), plan.micro, plan.accum, plan.world_size,
             seq_len, run_dir)
    if rank == 0:
        run.callbacks.callbacks += build_sinks(cfg.logger, run_dir, max_steps=t.max_steps,
                                               log_every=t.log_every, progress_bar=t.progress_bar,
                                               start_step=state.step, config=run.resolved_config)
    return run
