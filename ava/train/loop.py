"""The training loop: data + model + DeepSpeed engine, evaluation, checkpoints, resume, stop.

`Trainer(cfg, run_dir).fit()` on every rank. Rank 0 alone writes logs and metrics; every rank
writes its checkpoint shards. Monitors plug in as `ava.observe.Callback`s, sinks as
`ava.observe.MetricsSink`s.

One optimizer step: the micro-batches' forward/backward; then, before `engine.step()`, one
all-reduce of the losses (+ the stop vote), the global gradient norm (DeepSpeed's own), and the
health verdict (`ava.train.health`): an unhealthy step is skipped through DeepSpeed's overflow
path, the LR backs off, K consecutive incidents roll back to the last good checkpoint (the data
consumed since is skipped), too many rollbacks stop the run with a diagnosis (exit code 3).
Expert, memory and timing metrics are added on log steps (`trainer.log_every`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ava.checkpoints import read_manifest
from ava.config import AvaConfig, ConfigError
from ava.files import atomic_write_text
from ava.observe import Callback, CallbackList, StepOutput, Throughput, TrainState, build_sinks
from ava.observe.experts import ExpertMonitor
from ava.observe.memory import MemoryMonitor
from ava.observe.sinks import MetricsSink, send_event
from ava.observe.throughput import StepTimer, device_peak_tflops, flops_metrics
from ava.train import distributed
from ava.train import engine as engine_mod
from ava.train.checkpoint import CheckpointManager, capture_rng, rank_state_name, restore_rng
from ava.train.health import ROLLBACK, STOP, FaultInjector, HealthMonitor, StepGuard, UnhealthyRun
from ava.train.schedule import lr_at
from ava.train.signals import StopRequest

log = logging.getLogger("ava.train")


@dataclass
class FitResult:
    run_dir: Path
    step: int
    tokens_seen: int
    first_val_loss: Optional[float]
    last_val_loss: Optional[float]
    preempted: bool
    wall_s: float
    exit_status: int = 0  # 130/143 when stopped early by SIGINT/SIGTERM


STATUS_FILE = "status.json"


def write_status(run_dir: Path, status: str, step: int, exit_status: int) -> None:
    """`<run_dir>/status.json`: how the last attempt ended ("finished" or "stopped" early by a
    signal), for schedulers (launch/slurm.sbatch requeues a stopped run) and people."""
    record = {"status": status, "step": step, "exit_status": exit_status,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(record) + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def preflight(cfg: AvaConfig, world_size: int) -> Tuple[Dict[str, Any], str]:
    """Checks that need the world size but no process group, model or data (run before the
    process group exists); returns the DeepSpeed config and optimizer implementation."""
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds "
                          f"model.max_seq_len={cfg.model.max_seq_len}")
    return engine_mod.plan(cfg.trainer, cfg.deepspeed, cfg.model, world_size)


class Trainer:
    def __init__(self, cfg: AvaConfig, run_dir: Path, *, resolved_config: Optional[Dict] = None,
                 callbacks: Iterable[Callback] = (), sinks: Optional[List[MetricsSink]] = None,
                 stop: Optional[StopRequest] = None,
                 plan: Optional[Tuple[Dict[str, Any], str]] = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resolved_config = resolved_config or {}
        self.callbacks = CallbackList(callbacks)
        self._extra_sinks = list(sinks or [])
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()
        self.sinks: List[MetricsSink] = []
        self._warned_no_val = False
        self.stop = stop  # SIGTERM/SIGINT handler installed by the caller (covers setup too)
        self.plan = plan  # `preflight`'s result when the caller already ran it

    # ------------------------------------------------------------------ setup
    def _log_to_sinks(self, metrics: Dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def _evaluate(self) -> Optional[Dict[str, float]]:
        """Mean validation LM loss over `trainer.eval_batches` micro-batches per rank (fixed,
        unshuffled blocks, so every evaluation sees the same data) and its perplexity."""
        from ava.data import BlockLoader

        loader = BlockLoader(self.prepared.val, micro_batch_size=self.micro, rank=self.rank,
                             world_size=self.world_size, seed=self.cfg.seed, shuffle=False)
        batches = min(self.cfg.trainer.eval_batches, loader.batches_per_epoch)
        if batches == 0:
            if not self._warned_no_val:
                log.warning("evaluation skipped: %d validation blocks cannot fill one micro-batch "
                            "of %d on each of %d ranks (raise data.val_fraction)",
                            len(self.prepared.val), self.micro, self.world_size)
                self._warned_no_val = True
            return None
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for _ in range(batches):
                batch = next(loader)
                out = self.engine(batch["input_ids"].to(self.device),
                                  labels=batch["labels"].to(self.device))
                total[0] += out.lm_loss.double()
                total[1] += 1
        self.engine.train()
        distributed.all_reduce_sum(total)
        val_loss = float(total[0] / total[1])
        metrics = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}
        self.callbacks.on_eval(self.state, metrics)
        return metrics

    def _schedule_settings(self) -> Dict[str, float]:
        t = self.cfg.trainer
        return {"lr": t.lr, "min_lr": t.min_lr, "warmup_steps": t.warmup_steps,
                "decay_steps": t.decay_steps or t.max_steps}

    def _apply_schedule(self, saved: Optional[Dict[str, Any]]) -> None:
        """After a resume, the configured schedule wins over the one in the checkpoint (e.g. a
        run extended with a larger max_steps); say so when they differ."""
        current = self._schedule_settings()
        if saved and saved != current:
            log.warning("LR schedule changed since the checkpoint: %s -> %s; using the new one",
                        saved, current)
        sched = self.engine.lr_scheduler
        for fn in sched.lr_lambdas:
            fn.__dict__.update(current)
        sched.base_lrs = [current["lr"] for _ in sched.base_lrs]
        self._set_lr()

    def _set_lr(self) -> None:
        """The LR of the next update: the schedule at the scheduler's position (which skipped
        steps do not advance) times the health monitor's backoff multiplier."""
        lr = lr_at(self.engine.lr_scheduler.last_epoch, **self._schedule_settings())
        lr *= self.health.lr_multiplier
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _client_state(self) -> Dict[str, Any]:
        return {"step": self.state.step, "tokens_seen": self.state.tokens_seen,
                "world_size": self.world_size, "schedule": self._schedule_settings(),
                "data_fingerprint": self.prepared.fingerprint,
                "callbacks": self.callbacks.state_dict(), "health": self.health.state_dict(),
                "config": self.resolved_config,
                "val_losses": {"first": self.first_val, "last": self.last_val}}

    def _save(self) -> None:
        tag_dir = self.ckpt.save(self.engine, self.state.step, self._client_state(),
                                 {"rng": capture_rng(), "loader": self.loader.state_dict(),
                                  "step": self.state.step},
                                 files_written=self.injector.during_save,
                                 meta={"data_fingerprint": self.prepared.fingerprint,
                                       "expert_parallel_size": self.cfg.trainer.expert_parallel_size})
        self.last_saved = self.state.step
        self.callbacks.post_checkpoint_saved(self.state, tag_dir)

    def _resume(self) -> None:
        spec = self.cfg.trainer.resume
        tag_dir = self.ckpt.resolve(spec)
        if tag_dir is None:
            if spec == "auto":
                log.info("no complete checkpoint in %s: starting from step 0", self.ckpt.dir)
            return
        data_changed = self._check_resumable(tag_dir)
        client, rank_state = self.ckpt.load(self.engine, tag_dir)
        self.state.step = int(client["step"])
        self.state.tokens_seen = int(client.get("tokens_seen", 0))
        self.last_saved = self.state.step
        vals = client.get("val_losses") or {}
        self.first_val, self.last_val = vals.get("first"), vals.get("last")
        if rank_state is None:
            raise ConfigError(f"checkpoint {tag_dir} has no {rank_state_name(self.rank)} for "
                              f"rank {self.rank}: it was not written by an Ava run of this shape")
        if data_changed:
            log.warning("the loader starts the new data from its beginning")
        else:
            try:
                self.loader.load_state_dict(rank_state["loader"])
            except ValueError as exc:
                raise ConfigError(f"checkpoint {tag_dir}: {exc}") from exc
        restore_rng(rank_state["rng"])
        self.callbacks.load_state_dict(client.get("callbacks") or {})
        self.health.load_state_dict(client.get("health") or {})
        self._apply_schedule(client.get("schedule"))
        log.info("resuming from %s at step %d", tag_dir.name, self.state.step)

    def _check_resumable(self, tag_dir: Path) -> bool:
        """Refuse, before DeepSpeed loads anything, a checkpoint this run cannot continue
        exactly: another world size (ZeRO partitions, loader shards and RNG streams are per rank),
        another expert-parallel split, or other data (the loader position would point into a different token stream)."""
        manifest = read_manifest(tag_dir)
        saved_world = manifest.get("world_size")
        if saved_world is not None and int(saved_world) != self.world_size:
            raise ConfigError(
                f"checkpoint {tag_dir} was saved by {saved_world} rank(s) and this run has "
                f"{self.world_size}: resuming needs the same world size (ZeRO shards, loader "
                "positions and RNG streams are per rank). Relaunch with "
                f"{saved_world} rank(s), or export the checkpoint with ava-export (any world "
                "size) and start a new run directory")
        saved_ep, ep = int(manifest.get("expert_parallel_size", 1)), self.cfg.trainer.expert_parallel_size
        if saved_ep != ep:
            raise ConfigError(
                f"checkpoint {tag_dir} was saved with trainer.expert_parallel_size={saved_ep} and this run "
                f"has {ep}: each rank's experts and optimizer shards follow that split. Relaunch with "
                f"trainer.expert_parallel_size={saved_ep}, or export the checkpoint with ava-export and "
                "start a new run directory")
        saved_data = manifest.get("data_fingerprint")
        changed = saved_data is not None and saved_data != self.prepared.fingerprint
        if changed and not self.cfg.trainer.allow_data_change:
            raise ConfigError(
                f"checkpoint {tag_dir} was trained on data with fingerprint {saved_data}, but "
                f"the configured data has fingerprint {self.prepared.fingerprint} (data.sources, "
                "tokenizer or packing settings changed): the saved loader position would point "
                "into other data. Restore the original data, or set "
                "trainer.allow_data_change=true to continue on the new data anyway")
        if changed:
            log.warning("the data changed since checkpoint %s (fingerprint %s -> %s); "
                        "continuing (trainer.allow_data_change=true)", tag_dir.name, saved_data,
                        self.prepared.fingerprint)
        return changed

    # ------------------------------------------------------------------ main
    def fit(self) -> FitResult:
        from ava.data import BlockLoader, prepare_data
        from ava.model import AvaForCausalLM

        start = time.perf_counter()
        cfg, t = self.cfg, self.cfg.trainer
        ds_config, impl = self.plan or preflight(cfg, self.world_size)  # fails fast
        self.micro = int(ds_config["train_micro_batch_size_per_gpu"])
        self.accum = int(ds_config["gradient_accumulation_steps"])
        if t.deterministic:
            torch.use_deterministic_algorithms(True)

        self.prepared = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size,
                                     seed=cfg.seed)
        if self.rank == 0:  # the run directory is self-contained: ava-export reads it from here
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / ".tokenizer.json.tmp"
            shutil.copyfile(self.prepared.tokenizer_path, tmp)
            os.replace(tmp, self.run_dir / "tokenizer.json")
        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = AvaForCausalLM(cfg.model)
        seq_len = cfg.data.seq_len
        log.info("model %s: %s parameters (%s active per token), %.2f GFLOPs/token",
                 cfg.model.name, f"{model.num_parameters():,}",
                 f"{model.num_parameters(active_only=True):,}",
                 model.flops_per_token(seq_len) / 1e9)
        seed_everything(cfg.seed + self.rank)  # independent streams per rank from here on
        self.flops_per_token = float(model.flops_per_token(seq_len))
        self.engine = engine_mod.build_engine(model, t, ds_config, impl)
        self.device = self.engine.device
        self.health = HealthMonitor(t.health, fp16=bool(self.engine.fp16_enabled()))
        self.guard = StepGuard(self.engine)
        self.injector = FaultInjector(t.health.inject, self.rank)
        self.injector.attach(self.engine.module)
        self.experts = ExpertMonitor(
            num_layers=cfg.model.num_layers, num_experts=cfg.model.num_experts,
            top_k=cfg.model.top_k, log_every=t.log_every, heatmap_every=cfg.logger.heatmap_every,
            dead_expert_steps=t.monitor.dead_expert_steps, collapse_gini=t.monitor.collapse_gini,
            collapse_steps=t.monitor.collapse_steps, device=self.device)
        self.callbacks.callbacks.insert(0, self.experts)
        self.memory = MemoryMonitor(t.monitor.memory_warn_fraction, self.device)
        sync = None
        if self.device.type != "cpu" and t.monitor.sync_timing:
            from deepspeed.accelerator import get_accelerator

            sync = get_accelerator().synchronize
        self.timer = StepTimer(sync)
        self.peak_tflops = device_peak_tflops(self.device, t.monitor.peak_tflops)
        self.loader = BlockLoader(self.prepared.train, micro_batch_size=self.micro,
                                  rank=self.rank, world_size=self.world_size, seed=cfg.seed)
        tokens_per_step = self.micro * self.accum * self.world_size * seq_len
        self.state = TrainState(max_steps=t.max_steps, rank=self.rank,
                                world_size=self.world_size, run_dir=self.run_dir)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", t.keep_last,
                                      verify_hashes=t.verify_checkpoints)
        self.first_val: Optional[float] = None
        self.last_val: Optional[float] = None
        self.last_saved = -1
        self._resume()
        log.info("training: %d steps x %d tokens (micro %d x accum %d x world %d x seq %d); "
                 "run dir %s", t.max_steps, tokens_per_step, self.micro, self.accum,
                 self.world_size, seq_len, self.run_dir)

        if self.rank == 0:
            self.sinks = build_sinks(cfg.logger, self.run_dir, max_steps=t.max_steps,
                                     log_every=t.log_every, progress_bar=t.progress_bar,
                                     start_step=self.state.step, config=self.resolved_config)
            self.sinks += self._extra_sinks
        if self.rank == 0:  # replaced at the end; left as is by a crash
            write_status(self.run_dir, "running", self.state.step, 0)
        self.callbacks.on_train_start(self.state)
        throughput = Throughput(tokens_per_step)
        preempted = False
        try:
            if t.eval_at_start and self.state.step == 0 and t.eval_every > 0:
                self._record_eval(self._evaluate())
            with contextlib.ExitStack() as stack:  # the caller's handler, else our own
                stop = self.stop or stack.enter_context(StopRequest())
                while self.state.step < t.max_steps:
                    stop_all, rolled_back = self._train_step(throughput, stop.requested)
                    step = self.state.step
                    if rolled_back and not stop_all:
                        continue
                    if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                        self._record_eval(self._evaluate())
                    if stop_all or (t.save_every and step % t.save_every == 0):
                        self._save()
                    if stop_all:
                        if self.rank == 0:  # before any rank exits: a launcher may kill the rest
                            write_status(self.run_dir, "stopped", step, stop.exit_status)
                        distributed.barrier()
                        log.warning("stopped early at step %d (%s): checkpoint saved; exiting with "
                                    "status %d, run the same command to continue", step,
                                    stop.signal_name or "signal on another rank", stop.exit_status)
                        preempted = True
                        break
            if not preempted and t.save_at_end and self.last_saved != self.state.step:
                self._save()
            self.callbacks.on_train_end(self.state)
        finally:
            for sink in self.sinks:
                sink.close()
        wall = time.perf_counter() - start
        exit_status = stop.exit_status if preempted else 0
        if self.rank == 0:
            self._summary(preempted, wall)
            if not preempted:
                write_status(self.run_dir, "finished", self.state.step, 0)
        return FitResult(self.run_dir, self.state.step, self.state.tokens_seen, self.first_val,
                         self.last_val, preempted, wall, exit_status)

    def _summary(self, preempted: bool, wall: float) -> None:
        """The run's last lines: how it ended and where everything is."""
        if not preempted:
            val = ""
            if self.first_val is not None and self.last_val is not None:
                val = f", val loss {self.first_val:.4f} -> {self.last_val:.4f}"
            log.info("done: step %d%s, %.1fs", self.state.step, val, wall)
        log.info("run directory: %s (checkpoints/, metrics.jsonl, events.jsonl, train.log); "
                 "export it with `ava-export %s OUT_DIR`", self.run_dir, self.run_dir)
        for sink in self.sinks:
            where = getattr(sink, "where", None)
            if where:
                log.info("%s", where)

    def _record_eval(self, metrics: Optional[Dict[str, float]]) -> None:
        if metrics is None:
            return
        if self.first_val is None:
            self.first_val = metrics["val/loss"]
        self.last_val = metrics["val/loss"]
        self._log_to_sinks(metrics, self.state.step)

    def _train_step(self, throughput: Throughput, stop_requested: bool) -> Tuple[bool, bool]:
        """One optimizer step (all micro-batches); returns (any rank asked to stop, rolled back)."""
        t0 = time.perf_counter()
        engine, state, t = self.engine, self.state, self.cfg.trainer
        step_no = state.step + 1  # the step being computed, as it is logged
        log_step = step_no % t.log_every == 0 or step_no == t.max_steps
        timer = self.timer
        timer.start_step(sync=log_step)
        self.callbacks.pre_step(state)
        self.health.attempts += 1
        self.injector.begin_step(self.health.attempts)
        lr = float(engine.optimizer.param_groups[0]["lr"])
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        out = None
        for micro_step in range(self.accum):
            timer.begin("data")
            batch = next(self.loader)
            input_ids = batch["input_ids"].to(self.device)
            labels = batch["labels"].to(self.device)
            timer.end()
            timer.begin("forward")
            out = engine(input_ids, labels=labels)
            loss = self.injector.scale_loss(out.loss)
            timer.end()
            timer.begin("backward")
            engine.backward(loss)
            timer.end()
            dropped = torch.stack([s.dropped_fraction.float() for s in out.router_stats]).mean()
            sums[:4] += torch.stack([loss.detach(), out.lm_loss.detach(),
                                     out.aux_loss.detach(), out.z_loss.detach()]).double()
            sums[4] += dropped.double()
            self.callbacks.post_micro_batch(state, out.router_stats)
            if micro_step == self.accum - 1:
                timer.begin("health")
                verdict, worst = self._check_health(sums, stop_requested)
                timer.end()
                self.callbacks.pre_optim_step(state, engine)
            timer.begin("step")
            engine.step()
            timer.end()
        applied = bool(engine.was_step_applied())
        self.guard.after_step()
        if verdict.skip and applied:
            raise RuntimeError(f"step {step_no} was classified {verdict.kind} but DeepSpeed "
                               "applied it: the skip hook did not take effect")
        action = self.health.update(verdict, step_no)
        self._set_lr()
        values, stop_all = self._reduced, self._stop_all
        state.step += 1
        state.tokens_seen += throughput.tokens_per_step
        elapsed = time.perf_counter() - t0
        throughput.update(elapsed)
        per_device = throughput.tokens_per_s / self.world_size
        metrics: Dict[str, float] = {
            "train/loss": values[0], "train/lm_loss": values[1], "train/aux_loss": values[2],
            "train/z_loss": values[3], "moe/dropped_fraction": values[4], "train/lr": lr,
            "train/grad_norm": verdict.grad_norm if verdict.grad_norm is not None else math.nan,
            "train/tokens_seen": float(state.tokens_seen), "perf/step_time_s": elapsed,
            "perf/tokens_per_s": throughput.tokens_per_s,
            "perf/tokens_per_s_per_device": per_device,
            "perf/eta_s": throughput.eta_s(state.max_steps - state.step),
            "health/skipped": float(not applied), **self.health.metrics()}
        if verdict.loss_z is not None:
            metrics["health/loss_z"] = verdict.loss_z
        if verdict.grad_z is not None:
            metrics["health/grad_z"] = verdict.grad_z
        if log_step:
            metrics.update(timer.metrics())
            metrics.update(flops_metrics(self.flops_per_token, per_device, self.peak_tflops))
            metrics.update(self.memory.sample())
        output = StepOutput(values[0], metrics, list(out.router_stats) if out else [],
                            applied=applied)
        if verdict.incident:
            value, z = verdict.value_and_z()
            output.events.append({
                "event": "incident", "step": step_no, "kind": verdict.kind, "value": value,
                "z": z, "loss": verdict.loss, "grad_norm": verdict.grad_norm,
                "lr_multiplier": self.health.lr_multiplier, "consecutive": self.health.streak,
                "attempt": self.health.attempts, "worst_grad_norms": worst})
        self.callbacks.post_step(state, output)
        self._log_to_sinks(metrics, state.step)
        if self.rank == 0:
            for record in output.events:
                send_event(self.sinks, record)
        if action == STOP:
            diagnosis = self.health.diagnosis(step_no)
            if self.rank == 0:
                log.error("%s", diagnosis)
                send_event(self.sinks, {"event": "stop", "step": step_no, "title": "Training stopped",
                                        "text": diagnosis})
            raise UnhealthyRun(diagnosis)
        if action == ROLLBACK:
            self._rollback(step_no)
            return stop_all, True
        return stop_all, False

    def _check_health(self, sums: torch.Tensor, stop_requested: bool
                      ) -> Tuple[Any, List[Tuple[str, float]]]:
        """Before `engine.step()` on the last micro-batch: reduce the losses (and the stop vote)
        over ranks, take the global gradient norm, classify; arm the skip for an unhealthy step
        and record the largest per-parameter gradient norms (collective under ZeRO)."""
        packed = torch.cat([sums / self.accum,
                            torch.tensor([float(stop_requested)], dtype=torch.float64,
                                         device=self.device)])
        distributed.all_reduce_sum(packed)
        self._reduced = (packed[:5] / self.world_size).tolist()
        self._stop_all = bool(packed[5].item() > 0)
        grad_norm = self.guard.grad_norm()
        verdict = self.health.classify(self._reduced[0], grad_norm)
        worst: List[Tuple[str, float]] = []
        if verdict.skip:
            if verdict.incident:
                worst = self.guard.layer_grad_norms(self.cfg.trainer.health.worst_layers)
            self.guard.skip_next_step()
        return verdict, worst

    def _rollback(self, step_no: int) -> None:
        """Back to the newest complete checkpoint saved before the incident streak began; the
        loader keeps its position, so the data consumed since that checkpoint is skipped."""
        health = self.health
        first_bad = health.streak_start
        tag_dir = self.ckpt.resolve_before(first_bad - 1)
        health.on_rollback()
        if tag_dir is None:
            text = (f"rollback {health.rollbacks}/{self.cfg.trainer.health.max_rollbacks}: "
                    f"{self.cfg.trainer.health.rollback_after} consecutive unhealthy steps "
                    f"(from step {first_bad}) but no complete checkpoint at or before step "
                    f"{first_bad - 1}: parameters are unchanged (the steps were skipped); "
                    "continuing with fresh data")
            to_step = self.state.step
        else:
            client, _ = self.ckpt.load(self.engine, tag_dir)
            to_step = int(client["step"])
            self.state.step = to_step
            self.state.tokens_seen = int(client.get("tokens_seen", self.state.tokens_seen))
            self.last_saved = to_step
            self._apply_schedule(client.get("schedule"))
            text = (f"rollback {health.rollbacks}/{self.cfg.trainer.health.max_rollbacks}: "
                    f"{self.cfg.trainer.health.rollback_after} consecutive unhealthy steps "
                    f"(steps {first_bad}-{step_no}); restored {tag_dir.name} (step {to_step}), "
                    f"skipping the data of the {step_no - to_step} steps since; "
                    f"LR multiplier {health.lr_multiplier:.3g}")
        self._set_lr()
        if self.rank == 0:  # the console sink logs it
            send_event(self.sinks, {"event": "rollback", "step": step_no, "to_step": to_step,
                                    "rollbacks": health.rollbacks, "title": "Rollback",
                                    "text": text})
