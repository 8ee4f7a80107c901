"""The training loop: `fit(run)` sequences steps, evaluation and hooks; `ava.train.run` builds
everything it uses.

Per step (`ava.train.step`): micro-batches, one all-reduce of the losses and the stop vote,
gradient health before `engine.step()` (an unhealthy step is skipped through DeepSpeed's
overflow path), then the monitors' metrics and the sinks. Health sets the action: K
consecutive incidents roll back to the last good checkpoint (`ava.train.restore`; the data
consumed since is skipped), too many rollbacks stop the run with a diagnosis (exit code 3). A
SIGINT/SIGTERM on any rank ends the run at the next step boundary with a checkpoint and exit
status 130/143. Where things live: `ava.observe.callbacks` (hooks and their order),
`ava.train.health` (what is healthy), `ava.train.step_guard` (the only DeepSpeed internals).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ava import dist
from ava.observe.callbacks import ROLLBACK, STOP, StepOutput
from ava.train.health import UnhealthyRun
from ava.train.restore import rollback
from ava.train.run import Run
from ava.train.rundir import write_status
from ava.train.signals import StopRequest
from ava.train.step import train_step

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


def evaluate(run: Run) -> None:
    metrics = run.evaluate(run.engine)
    if metrics is None:
        return
    state = run.state
    if state.first_val_loss is None:
        state.first_val_loss = metrics["val/loss"]
    state.last_val_loss = metrics["val/loss"]
    run.callbacks.on_eval(state, metrics)
    run.callbacks.log_metrics(state, metrics, state.step)


def report(run: Run, output: StepOutput) -> None:
    """The step's metrics and events to the sinks (rank 0; a no-op elsewhere)."""
    run.callbacks.log_metrics(run.state, output.metrics, run.state.step)
    for record in output.events:
        run.callbacks.on_event(run.state, record)


def fit(run: Run) -> FitResult:
    start = time.perf_counter()
    t, state, callbacks = run.cfg.trainer, run.state, run.callbacks
    if state.rank == 0:  # replaced at the end; left as is by a crash
        write_status(run.run_dir, "running", state.step, 0)
    callbacks.on_train_start(state)
    stop: Optional[StopRequest] = None
    try:
        if t.eval_at_start and state.step == 0 and t.eval_every > 0:
            evaluate(run)
        with contextlib.ExitStack() as stack:  # the caller's handler, else our own
            stop = run.stop or stack.enter_context(StopRequest())
            while state.step < t.max_steps:
                output = train_step(run, stop.requested)
                report(run, output)
                if output.action == STOP:
                    raise UnhealthyRun(output.diagnosis)
                if output.action == ROLLBACK:
                    rollback(run, state.step)
                    if not output.stop_requested:
                        continue
                if t.eval_every and (state.step % t.eval_every == 0 or state.step == t.max_steps):
                    evaluate(run)
                state.stopping = output.stop_requested
                callbacks.on_step_end(state)  # checkpointing saves when due or stopping
                if state.stopping:
                    if state.rank == 0:  # before any rank exits: a launcher may kill the rest
                        write_status(run.run_dir, "stopped", state.step, stop.exit_status)
                    dist.barrier()
                    log.warning("stopped early at step %d (%s): checkpoint saved; exiting with "
                                "status %d, run the same command to continue", state.step,
                                stop.signal_name or "signal on another rank", stop.exit_status)
                    break
        callbacks.on_train_end(state)
    finally:
        callbacks.close()
    wall = time.perf_counter() - start
    exit_status = stop.exit_status if state.stopping and stop else 0
    if state.rank == 0:
        if not state.stopping:
            write_status(run.run_dir, "finished", state.step, 0)
        # not after a signal: the launcher ends this rank once the others have exited, and a
        # preempted job's time is short; the next attempt (or `ava-report`) draws the page
        _summary(run, wall, None if state.stopping else write_run_report(run))
    return FitResult(run.run_dir, state.step, state.tokens_seen, state.first_val_loss,
                     state.last_val_loss, state.stopping, wall, exit_status)


def write_run_report(run: Run) -> Optional[Path]:
    """`<run_dir>/report.html` (rank 0, `logger.report`). Training is over and its files are
    safe: a report that cannot be drawn is a warning, never a failed run."""
    logger = run.cfg.logger
    if not logger.report:
        return None
    if not logger.jsonl:
        log.info("report: not written (it is drawn from metrics.jsonl; logger.jsonl=false)")
        return None
    from ava.observe.report import ReportError, write_report

    start = time.perf_counter()
    try:
        path = write_report([run.run_dir])
    except ReportError as exc:
        log.warning("report: not written: %s", exc)
        return None
    except Exception as exc:  # a plotting failure must not turn a finished run into a failed one
        log.warning("report: not written (%s: %s); retry with `ava-report %s`",
                    type(exc).__name__, exc, run.run_dir)
        return None
    log.debug("report written in %.1fs", time.perf_counter() - start)
    return path


def _summary(run: Run, wall: float, report_path: Optional[Path] = None) -> None:
    """The run's last lines: how it ended and where everything is."""
    state = run.state
    if not state.stopping:
        val = ""
        if state.first_val_loss is not None and state.last_val_loss is not None:
            val = f", val loss {state.first_val_loss:.4f} -> {state.last_val_loss:.4f}"
        log.info("done: step %d%s, %.1fs", state.step, val, wall)
    log.info("run directory: %s (checkpoints/, metrics.jsonl, events.jsonl, train.log); "
             "export it with `ava-export %s OUT_DIR`", run.run_dir, run.run_dir)
    if report_path is not None:
        log.info("report: %s (open it in a browser; `ava-report %s` redraws it)", report_path, run.run_dir)
    for cb in run.callbacks.callbacks:
        if cb.summary():
            log.info("%s", cb.summary())
