"""The training loop: data + model + DeepSpeed engine, evaluation, checkpoints, resume, stop.

`Trainer(cfg, run_dir).fit()` on every rank. Rank 0 alone writes logs and metrics; every rank
writes its checkpoint shards. Monitors plug in as `ava.observe.Callback`s, sinks as
`ava.observe.MetricsSink`s.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch

from ava.config import AvaConfig, ConfigError
from ava.observe import Callback, CallbackList, StepOutput, Throughput, TrainState, build_sinks
from ava.observe.sinks import MetricsSink
from ava.train import distributed
from ava.train import engine as engine_mod
from ava.train.checkpoint import CheckpointManager, capture_rng, restore_rng
from ava.train.schedule import lr_at

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: AvaConfig, run_dir: Path, *, resolved_config: Optional[Dict] = None,
                 callbacks: Iterable[Callback] = (), sinks: Optional[List[MetricsSink]] = None
                 ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resolved_config = resolved_config or {}
        self.callbacks = CallbackList(callbacks)
        self._extra_sinks = list(sinks or [])
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()
        self.sinks: List[MetricsSink] = []
        self._warned_no_val = False

    # ------------------------------------------------------------------ setup
    def _validate(self) -> None:
        cfg = self.cfg
        if cfg.data.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds "
                              f"model.max_seq_len={cfg.model.max_seq_len}")

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
        lr = lr_at(sched.last_epoch, **current)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _client_state(self) -> Dict[str, Any]:
        return {"step": self.state.step, "tokens_seen": self.state.tokens_seen,
                "world_size": self.world_size, "schedule": self._schedule_settings(),
                "data_fingerprint": self.prepared.fingerprint,
                "callbacks": self.callbacks.state_dict(), "config": self.resolved_config,
                "val_losses": {"first": self.first_val, "last": self.last_val}}

    def _save(self) -> None:
        tag_dir = self.ckpt.save(self.engine, self.state.step, self._client_state(),
                                 {"rng": capture_rng(), "loader": self.loader.state_dict(),
                                  "step": self.state.step})
        self.last_saved = self.state.step
        self.callbacks.post_checkpoint_saved(self.state, tag_dir)

    def _resume(self) -> None:
        spec = self.cfg.trainer.resume
        tag_dir = self.ckpt.resolve(spec)
        if tag_dir is None:
            if spec == "auto":
                log.info("no complete checkpoint in %s: starting from step 0", self.ckpt.dir)
            return
        client, rank_state = self.ckpt.load(self.engine, tag_dir)
        self.state.step = int(client["step"])
        self.state.tokens_seen = int(client.get("tokens_seen", 0))
        self.last_saved = self.state.step
        vals = client.get("val_losses") or {}
        self.first_val, self.last_val = vals.get("first"), vals.get("last")
        if client.get("data_fingerprint") not in (None, self.prepared.fingerprint):
            log.warning("the data changed since checkpoint %s (fingerprint %s -> %s)",
                        tag_dir.name, client.get("data_fingerprint"), self.prepared.fingerprint)
        same_world = int(client.get("world_size", self.world_size)) == self.world_size
        if rank_state is not None and same_world:
            self.loader.load_state_dict(rank_state["loader"])
            restore_rng(rank_state["rng"])
        else:
            log.warning("checkpoint %s was saved with world size %s, now %d: data position is "
                        "approximate and RNG streams are re-seeded", tag_dir.name,
                        client.get("world_size"), self.world_size)
            state0 = torch.load(tag_dir / "ava_rank_00000.pt", map_location="cpu",
                                weights_only=True)
            self.loader.load_state_dict(state0["loader"], strict=False)
            seed_everything(self.cfg.seed + self.rank + 7919 * self.state.step)
        self.callbacks.load_state_dict(client.get("callbacks") or {})
        self._apply_schedule(client.get("schedule"))
        log.info("resuming from %s at step %d", tag_dir.name, self.state.step)

    # ------------------------------------------------------------------ main
    def fit(self) -> FitResult:
        from ava.data import BlockLoader, prepare_data
        from ava.model import AvaForCausalLM

        start = time.perf_counter()
        cfg, t = self.cfg, self.cfg.trainer
        self._validate()
        ds_config, impl = engine_mod.plan(t, cfg.deepspeed, self.world_size)  # fails fast
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
        self.engine = engine_mod.build_engine(model, t, ds_config, impl)
        self.device = self.engine.device
        self.loader = BlockLoader(self.prepared.train, micro_batch_size=self.micro,
                                  rank=self.rank, world_size=self.world_size, seed=cfg.seed)
        tokens_per_step = self.micro * self.accum * self.world_size * seq_len
        self.state = TrainState(max_steps=t.max_steps, rank=self.rank,
                                world_size=self.world_size, run_dir=self.run_dir)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", t.keep_last)
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
        self.callbacks.on_train_start(self.state)
        throughput = Throughput(tokens_per_step)
        preempted = False
        try:
            if t.eval_at_start and self.state.step == 0 and t.eval_every > 0:
                self._record_eval(self._evaluate())
            from ava.train.signals import StopRequest

            with StopRequest() as stop:
                while self.state.step < t.max_steps:
                    stop_all = self._train_step(throughput, stop.requested)
                    step = self.state.step
                    if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                        self._record_eval(self._evaluate())
                    if stop_all or (t.save_every and step % t.save_every == 0):
                        self._save()
                    if stop_all:
                        log.warning("stopped by signal at step %d; checkpoint saved, exiting",
                                    step)
                        preempted = True
                        break
            if not preempted and t.save_at_end and self.last_saved != self.state.step:
                self._save()
            self.callbacks.on_train_end(self.state)
        finally:
            for sink in self.sinks:
                sink.close()
        wall = time.perf_counter() - start
        if (self.rank == 0 and not preempted and self.first_val is not None
                and self.last_val is not None):
            log.info("done: step %d, val loss %.4f -> %.4f, %.1fs", self.state.step,
                     self.first_val, self.last_val, wall)
        return FitResult(self.run_dir, self.state.step, self.state.tokens_seen, self.first_val,
                         self.last_val, preempted, wall)

    def _record_eval(self, metrics: Optional[Dict[str, float]]) -> None:
        if metrics is None:
            return
        if self.first_val is None:
            self.first_val = metrics["val/loss"]
        self.last_val = metrics["val/loss"]
        self._log_to_sinks(metrics, self.state.step)

    def _train_step(self, throughput: Throughput, stop_requested: bool) -> bool:
        """One optimizer step (all micro-batches); returns True when any rank asked to stop."""
        t0 = time.perf_counter()
        engine, state = self.engine, self.state
        self.callbacks.pre_step(state)
        lr = float(engine.get_lr()[0])
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        out = None
        for micro_step in range(self.accum):
            batch = next(self.loader)
            out = engine(batch["input_ids"].to(self.device),
                         labels=batch["labels"].to(self.device))
            engine.backward(out.loss)
            if micro_step == self.accum - 1:
                self.callbacks.pre_optim_step(state, engine)
            engine.step()
            dropped = torch.stack([s.dropped_fraction.float() for s in out.router_stats]).mean()
            sums[:4] += torch.stack([out.loss.detach(), out.lm_loss.detach(),
                                     out.aux_loss.detach(), out.z_loss.detach()]).double()
            sums[4] += dropped.double()
        # one collective per step: the mean losses over ranks and micro-batches + the stop vote
        packed = torch.cat([sums / self.accum,
                            torch.tensor([float(stop_requested)], dtype=torch.float64,
                                         device=self.device)])
        distributed.all_reduce_sum(packed)
        values = (packed[:5] / self.world_size).tolist()
        stop_all = bool(packed[5].item() > 0)
        state.step += 1
        state.tokens_seen += throughput.tokens_per_step
        elapsed = time.perf_counter() - t0
        throughput.update(elapsed)
        grad_norm = engine.get_global_grad_norm()
        metrics: Dict[str, float] = {
            "train/loss": values[0], "train/lm_loss": values[1], "train/aux_loss": values[2],
            "train/z_loss": values[3], "moe/dropped_fraction": values[4], "train/lr": lr,
            "train/tokens_seen": float(state.tokens_seen), "perf/step_time_s": elapsed,
            "perf/tokens_per_s": throughput.tokens_per_s,
            "perf/eta_s": throughput.eta_s(state.max_steps - state.step)}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        self.callbacks.post_step(state, StepOutput(values[0], metrics,
                                                   list(out.router_stats) if out else []))
        self._log_to_sinks(metrics, state.step)
        return stop_all
