"""Expert utilisation per MoE layer over a window of steps, dead experts, router-collapse alerts.

Accumulates each micro-batch's `RouterStats` on the device (no host sync); on log steps one
all-reduce (SUM) of a packed `[L, 2E + 3]` tensor gives the global window: tokens per expert,
per-expert "seen in the last `dead_expert_steps` steps" flags, and dropped-fraction/aux/z sums.
Gini and entropy come from `ava.model.losses` (the same functions the model reports with).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch

from ava.dist import all_reduce_sum
from ava.model.losses import entropy, gini
from ava.observe.callbacks import Callback, StepOutput, TrainState

log = logging.getLogger("ava.train")


def max_gini(num_experts: int, top_k: int) -> float:
    """Gini when top-k routing sends every token to the same k experts: (E - k) / E."""
    return max(num_experts - top_k, 0) / num_experts if num_experts else 0.0


class ExpertMonitor(Callback):
    """Every rank: `post_micro_batch` accumulates, `post_step` reduces and reports on log steps
    (every rank takes part in the all-reduce; rank 0's sinks receive the metrics)."""

    name = "experts"

    def __init__(self, *, num_layers: int, num_experts: int, top_k: int, log_every: int,
                 heatmap_every: int, dead_expert_steps: int, collapse_gini: float,
                 collapse_steps: int, device: Any, layer_ids: Optional[List[int]] = None) -> None:
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        # the model's index of each MoE layer (dense layers have none), which names its metrics
        self.layer_ids = list(layer_ids) if layer_ids is not None else list(range(num_layers))
        if len(self.layer_ids) != num_layers:
            raise ValueError(f"layer_ids {self.layer_ids} do not name {num_layers} MoE layers")
        self.log_every, self.heatmap_every = log_every, heatmap_every
        self.dead_expert_steps = dead_expert_steps
        self.collapse_gini, self.collapse_steps = collapse_gini, collapse_steps
        self.device = device
        shape = (num_layers, num_experts)
        self.window = torch.zeros(shape, device=device)  # tokens since the last log step
        self.step_counts = torch.zeros(shape, device=device)  # tokens in the current step
        self.extras = torch.zeros(num_layers, 3, device=device)  # dropped, aux, z sums
        self.micro_batches = 0
        self.last_seen = torch.zeros(shape, device=device)  # step an expert last got a token
        self.gini_high_since: List[Optional[int]] = [None] * num_layers
        self.alerted: Dict[str, bool] = {}
        self._restored = False

    # ---- hooks
    def on_train_start(self, state: TrainState) -> None:
        if not self._restored:  # a fresh run: every expert counts as seen at the start
            self.last_seen.fill_(float(state.step))

    def post_micro_batch(self, state: TrainState, router_stats: List[Any]) -> None:
        if not router_stats:
            return
        with torch.no_grad():
            self.step_counts += torch.stack([s.tokens_per_expert.float() for s in router_stats])
            self.extras += torch.stack([torch.stack([s.dropped_fraction, s.aux_loss, s.z_loss])
                                        .detach().float() for s in router_stats])
        self.micro_batches += 1

    def post_step(self, state: TrainState, output: StepOutput) -> None:
        step = state.step
        self.last_seen = torch.where(self.step_counts > 0,
                                     torch.full_like(self.last_seen, float(step)), self.last_seen)
        self.window += self.step_counts
        self.step_counts.zero_()
        if not (step % self.log_every == 0 or step == state.max_steps):
            return
        alive = (step - self.last_seen < self.dead_expert_steps).float()
        packed = torch.cat([self.window, alive, self.extras,
                            torch.full((self.num_layers, 1), float(self.micro_batches),
                                       device=self.device)], dim=1)
        all_reduce_sum(packed)
        packed = packed.cpu()  # the one host sync, on log steps only
        E = self.num_experts
        counts, alive_any, extras, micro = (packed[:, :E], packed[:, E:2 * E],
                                            packed[:, 2 * E:2 * E + 3], packed[:, 2 * E + 3])
        self.window.zero_()
        self.extras.zero_()
        self.micro_batches = 0
        output.metrics.update(self.summarise(counts, alive_any, extras, micro))
        heatmap = self.heatmap_every and (step % self.heatmap_every == 0 or step == state.max_steps)
        if heatmap:
            total = counts.sum(dim=1, keepdim=True).clamp_min(1.0)
            output.metrics["moe/load_heatmap"] = (counts / total).tolist()  # type: ignore[assignment]
        output.events.extend(self._alerts(counts, alive_any, step))

    # ---- math
    def summarise(self, counts: torch.Tensor, alive: torch.Tensor, extras: torch.Tensor,
                  micro: torch.Tensor) -> Dict[str, float]:
        """Per-layer metrics from global window sums (`alive[l, e]` > 0: expert e of layer l
        got a token in the last `dead_expert_steps` steps on some rank)."""
        metrics: Dict[str, float] = {}
        ginis, dead_total = [], 0
        for layer in range(self.num_layers):
            c = counts[layer]
            n = max(float(micro[layer]), 1.0)
            mean = float(c.mean())
            g = float(gini(c)) if float(c.sum()) > 0 else 0.0
            ginis.append(g)
            dead = int((alive[layer] == 0).sum())
            dead_total += dead
            prefix = f"moe/layer{self.layer_ids[layer]}"
            metrics.update({
                f"{prefix}/gini": g,
                f"{prefix}/entropy": float(entropy(c)) if float(c.sum()) > 0 else 0.0,
                f"{prefix}/max_load": float(c.max()) / mean if mean > 0 else 0.0,
                f"{prefix}/min_load": float(c.min()) / mean if mean > 0 else 0.0,
                f"{prefix}/dropped_fraction": float(extras[layer, 0]) / n,
                f"{prefix}/aux_loss": float(extras[layer, 1]) / n,
                f"{prefix}/z_loss": float(extras[layer, 2]) / n,
                f"{prefix}/dead_experts": float(dead),
            })
        metrics["moe/gini"] = sum(ginis) / len(ginis) if ginis else 0.0
        metrics["moe/gini_max"] = max(ginis) if ginis else 0.0
        metrics["moe/dead_experts"] = float(dead_total)
        return metrics

    def _alerts(self, counts: torch.Tensor, alive: torch.Tensor, step: int) -> List[Dict[str, Any]]:
        events = []
        ceiling = max_gini(self.num_experts, self.top_k) or 1.0
        for layer in range(self.num_layers):
            c = counts[layer]
            g = float(gini(c)) / ceiling if float(c.sum()) > 0 else 0.0
            if g > self.collapse_gini:
                if self.gini_high_since[layer] is None:
                    self.gini_high_since[layer] = step
            else:
                self.gini_high_since[layer] = None
            since = self.gini_high_since[layer]
            dead = [e for e in range(self.num_experts) if float(alive[layer, e]) == 0]
            reasons = []
            if since is not None and step - since >= self.collapse_steps:
                reasons.append(f"Gini {g:.2f} of its maximum above {self.collapse_gini} "
                               f"since step {since}")
            if dead:
                reasons.append(f"dead experts {dead} (no tokens for {self.dead_expert_steps} steps)")
            name = self.layer_ids[layer]
            key = f"layer{name}"
            if reasons and not self.alerted.get(key):
                self.alerted[key] = True
                events.append({"event": "alert", "kind": "router_collapse", "step": step,
                               "layer": name, "title": f"Router collapse in MoE layer {name}",
                               "text": f"step {step}: layer {name}: " + "; ".join(reasons),
                               "load": (c / c.sum().clamp_min(1.0)).tolist()})
            elif not reasons:
                self.alerted[key] = False
        return events

    # ---- checkpoint state
    def state_dict(self) -> Dict[str, Any]:
        return {"last_seen": self.last_seen.cpu(), "gini_high_since": list(self.gini_high_since),
                "alerted": dict(self.alerted)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "last_seen" in state and tuple(state["last_seen"].shape) == tuple(self.last_seen.shape):
            self.last_seen = state["last_seen"].to(self.device).float()
            self._restored = True
        self.gini_high_since = list(state.get("gini_high_since") or self.gini_high_since)
        self.alerted = dict(state.get("alerted") or {})
