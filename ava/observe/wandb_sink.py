"""The Weights & Biases sink, and how Ava picks W&B's mode so that a user without an API key
gets an offline run, never a prompt or a hang."""

from __future__ import annotations

import io
import json
import logging
import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ava.files import atomic_write_text
from ava.observe.callbacks import Callback, TrainState
from ava.observe.console import _fmt

log = logging.getLogger("ava.train")

HEATMAP_KEY = "moe/load_heatmap"
# per layer keys the load-over-time images use: the dropped fraction they draw, and the Gini,
# whose layer numbers name the heatmap's rows (dense layers have none)
LOAD_SUFFIXES = ("/dropped_fraction", "/gini")


SECRET_ENV_HINTS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def redact(config: Any, patterns: List[str]) -> Any:
    """`config` with secrets replaced by "<redacted>": values under a key that contains one of
    `patterns` (`logger.redact_keys`, case-insensitive), and any string equal to the value of an
    environment variable whose name says it is a secret (e.g. a `${oc.env:HF_TOKEN}`)."""
    pats = [p.lower() for p in patterns]
    secrets_in_env = {v for k, v in os.environ.items()
                      if v and len(v) >= 8 and any(h in k.upper() for h in SECRET_ENV_HINTS)}

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if node is not None and key and any(p in key.lower() for p in pats):
            return "<redacted>"
        if isinstance(node, str) and node in secrets_in_env:
            return "<redacted>"
        return node

    return walk(config)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


WANDB_MODES_ACCEPTED = {"online": "online", "offline": "offline", "disabled": "disabled",
                        "dryrun": "offline", "run": "online"}


def wandb_mode(configured: Optional[str]) -> tuple[str, Optional[str]]:
    """(mode, note): `logger.mode`, else `WANDB_MODE`, else online with an API key, else offline
    with a one-line note. Never a mode in which W&B would prompt for a key. An empty WANDB_MODE
    (as CI templates often export) counts as unset; an unknown one is named and logs offline."""
    env = os.environ.get("WANDB_MODE") or None
    if configured:
        mode = configured
    elif env:
        mode = WANDB_MODES_ACCEPTED.get(env.strip().lower())
        if mode is None:
            return "offline", (f"W&B: WANDB_MODE={env!r} is not one of online, offline, disabled: "
                               "logging offline")
    elif _has_wandb_key():
        return "online", None
    else:
        return "offline", ("W&B: no API key (WANDB_API_KEY or `wandb login`) and no WANDB_MODE: "
                           "logging offline")
    if mode == "online" and not _has_wandb_key():
        return "offline", "W&B: mode online but no API key found: logging offline instead"
    return mode, None


class WandbSink(Callback):
    """Weights & Biases run in `<run_dir>/wandb`; its id is kept in the run directory so a
    resumed run continues the same W&B run.

    W&B needs a non-decreasing step; after a rollback the trainer's step goes back, so the W&B
    step is the trainer's step plus an offset that grows at each rollback (`train/step` holds
    the trainer's own step for plotting). A resumed process re-computes the steps between its
    checkpoint and the point where the previous attempt stopped; those were already logged (with
    the same values: resume is exact), so they are not sent again. The id, the last W&B step
    sent and the offset live in `<run_dir>/wandb_state.json` for that purpose.

    On heatmap steps the expert load also goes out as images (`ava-report`'s heatmap and
    per-layer load over time, drawn from every heatmap step so far), since W&B draws a table
    but no layer x expert picture."""

    INCIDENT_COLUMNS = ("step", "kind", "value", "z", "lr_multiplier", "worst_grad_norms")
    STATE_FILE = "wandb_state.json"
    name = "wandb"

    def __init__(self, run_dir: Path, *, project: str, entity: Optional[str], group: Optional[str],
                 name: Optional[str], tags: List[str], mode: Optional[str],
                 config: Dict[str, Any], resumed: bool = True) -> None:
        import wandb

        resolved, note = wandb_mode(mode)
        # W&B validates WANDB_MODE itself (an empty or unknown value is a pydantic error): hand it
        # the mode decided here, which also reaches its service process
        os.environ["WANDB_MODE"] = resolved
        self._state_path = run_dir / self.STATE_FILE
        # a run that starts from step 0 (first launch, trainer.resume=never) is a new W&B run:
        # its steps must not be mistaken for ones an earlier attempt already sent
        state = self._read_state(run_dir) if resumed else {}
        run_id = str(state.get("id") or secrets.token_hex(4))
        self.run = wandb.init(
            project=project, entity=entity, group=group, name=name or run_dir.name,
            tags=list(tags) or None, config=config, dir=str(run_dir), id=run_id,
            resume="allow", mode=resolved,
            settings=wandb.Settings(silent=True, console="off", init_timeout=90))
        run_files = getattr(self.run, "dir", None)
        local = Path(run_files).parent if run_files else run_dir / "wandb"
        if resolved == "online":
            self.where = f"W&B run: {getattr(self.run, 'url', None) or run_id}"
        elif resolved == "offline":
            self.where = f"W&B run (offline): {local}; upload with `wandb sync {local}`"
        else:
            self.where = ""
        if note:
            log.warning("%s; sync later with `wandb sync %s`", note, local)
        elif resolved == "online":
            log.info("%s", self.where)
        self._wandb = wandb
        self._run_dir = run_dir
        self._load_history: Optional[List[Dict[str, Any]]] = None  # read on the first heatmap
        self._id = run_id
        self._offset = int(state.get("offset", 0))
        # W&B steps up to here were sent by an earlier attempt of this run (or are on the server)
        self._sent_upto = max(int(state.get("last_step", -1)),
                              int(getattr(self.run, "step", 0) or 0) - 1)
        self._last = -1
        self._skipped = 0
        self._incidents: List[List[Any]] = []
        if self._sent_upto >= 0:
            log.info("W&B: continuing run %s after step %d", run_id, self._sent_upto)
        self._write_state(self._sent_upto)

    @classmethod
    def _read_state(cls, run_dir: Path) -> Dict[str, Any]:
        path = run_dir / cls.STATE_FILE
        if path.is_file():
            try:
                return dict(json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                log.warning("W&B: %s is unreadable (%s): starting a new W&B run", path, exc)
                return {}
        legacy = run_dir / "wandb_id.txt"  # runs written before wandb_state.json
        return {"id": legacy.read_text().strip()} if legacy.is_file() else {}

    def _write_state(self, last_step: int) -> None:
        # rewritten after every step sent: atomic, but not fsynced (a lost update only means
        # one step is sent twice after a crash, which W&B ignores)
        record = {"id": self._id, "last_step": last_step, "offset": self._offset}
        atomic_write_text(self._state_path, json.dumps(record) + "\n", durable=False)

    def _step(self, step: int) -> int:
        if step + self._offset < self._last:  # a rollback: continue after the last W&B step
            self._offset = self._last - step + 1
        self._last = step + self._offset
        return self._last

    def _send(self, data: Dict[str, Any], step: int) -> bool:
        """Log `data` at W&B step `step` unless an earlier attempt of this run already did."""
        if step <= self._sent_upto:
            self._skipped += 1
            return False
        self.run.log(data, step=step)
        self._write_state(step)
        return True

    @staticmethod
    def _load_record(metrics: Mapping[str, Any], step: int) -> Dict[str, Any]:
        kept = {k: v for k, v in metrics.items() if k == HEATMAP_KEY or k.endswith(LOAD_SUFFIXES)}
        return {"step": step, **kept} if kept else {}

    def _load_images(self, step: int) -> Dict[str, Any]:
        """W&B images of the expert load at `step`, keyed as `ava-report` names them."""
        from PIL import Image

        from ava.observe.report import expert_load_panels

        assert self._load_history is not None
        return {panel.key: self._wandb.Image(Image.open(io.BytesIO(panel.png)), caption=panel.title)
                for panel in expert_load_panels(self._load_history)}

    def log_metrics(self, state: Optional[TrainState], metrics: Mapping[str, Any], step: int) -> None:
        data: Dict[str, Any] = dict(metrics)
        data["train/step"] = step
        record = self._load_record(metrics, step)
        if record and self._load_history is None:  # a resumed run: its earlier steps, from JSONL
            from ava.observe.report.records import read_jsonl

            earlier = read_jsonl(self._run_dir / "metrics.jsonl").records
            self._load_history = [r for r in (self._load_record(e, e["step"]) for e in earlier
                                              if e["step"] < step) if r]
        if record:
            self._load_history.append(record)
        wandb_step = self._step(step)
        heatmap = data.pop(HEATMAP_KEY, None)
        if heatmap:
            experts = len(heatmap[0])
            data[HEATMAP_KEY] = self._wandb.Table(
                columns=["layer", *(f"expert_{e}" for e in range(experts))],
                data=[[layer, *row] for layer, row in enumerate(heatmap)])
            if wandb_step > self._sent_upto:  # not drawn for a step W&B already has
                data.update(self._load_images(step))
        self._send(data, wandb_step)

    def on_event(self, state: Optional[TrainState], record: Mapping[str, Any]) -> None:
        kind = record.get("event")
        step = int(record.get("step", 0))
        if kind == "incident":
            worst = "; ".join(f"{n}={v:.4g}" for n, v in record.get("worst_grad_norms") or [])
            self._incidents.append([step, record.get("kind"), _fmt(record.get("value")),
                                    _fmt(record.get("z")), record.get("lr_multiplier"), worst])
            table = self._wandb.Table(columns=list(self.INCIDENT_COLUMNS), data=self._incidents)
            if not self._send({"health/incidents_table": table}, self._step(step)):
                return  # an earlier attempt of this run already reported it
            title, level = f"Step {step} skipped: {record.get('kind')}", "WARN"
            text = (f"{record.get('kind')} at step {step}: value {_fmt(record.get('value'))}, "
                    f"z {_fmt(record.get('z'))}; LR multiplier {record.get('lr_multiplier')}; "
                    f"largest gradient norms: {worst or '-'}")
        elif kind in ("alert", "rollback", "stop"):
            title = str(record.get("title") or kind)
            text = str(record.get("text") or record)
            level = "ERROR" if kind == "stop" else "WARN"
        else:
            return
        try:
            self.run.alert(title=title[:64], text=text, level=level, wait_duration=0)
        except Exception as exc:  # alerts are best-effort (offline, rate limits)
            log.debug("wandb.alert failed: %s", exc)

    def summary(self) -> str:
        return self.where

    def close(self) -> None:
        if self._skipped:
            log.info("W&B: %d record(s) of steps <= %d were already logged by an earlier attempt "
                     "of this run and were not sent again", self._skipped, self._sent_upto)
        self.run.finish()
