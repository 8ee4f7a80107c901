"""The metric sinks a run's `logger.*` asks for (rank 0 only): console, JSONL, W&B. Each is a
`Callback` that takes `log_metrics` and `on_event`; backends are imported lazily (W&B only when
`logger.backend=wandb`).

Values are floats, except `moe/load_heatmap` (a layers x experts list of load fractions): JSONL
writes the list, W&B logs it as a `wandb.Table` (one row per layer) under the same key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List

from ava.observe.callbacks import Callback
from ava.observe.console import ConsoleSink
from ava.observe.jsonl import JsonlSink
from ava.observe.wandb_sink import WandbSink, redact

log = logging.getLogger("ava.train")


def build_sinks(logger_cfg: Any, run_dir: Path, *, max_steps: int, log_every: int,
                progress_bar: bool, start_step: int, config: Dict[str, Any]) -> List[Callback]:
    """The sinks `logger.*` asks for (call on rank 0 only). A W&B failure never stops training."""
    sinks: List[Callback] = [ConsoleSink(max_steps, log_every, progress_bar, start_step)]
    resumed = start_step > 0
    if logger_cfg.jsonl:
        sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
    if logger_cfg.backend == "wandb":
        try:
            sinks.append(WandbSink(run_dir, project=logger_cfg.project, entity=logger_cfg.entity,
                                   group=logger_cfg.group, name=logger_cfg.run_name,
                                   tags=list(logger_cfg.tags), mode=logger_cfg.mode,
                                   config=redact(config, list(logger_cfg.redact_keys)),
                                   resumed=resumed))
        except Exception as exc:  # network, auth, disk: report and train on
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            log.warning("W&B disabled: it could not start (%s: %s); metrics still go to the console%s",
                        type(exc).__name__, first,
                        f" and {run_dir / 'metrics.jsonl'}" if logger_cfg.jsonl else "")
    return sinks
