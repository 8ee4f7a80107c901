"""`ava-train` / `python -m ava.train`: the Hydra app over `conf/`.

    ava-train experiment=cpu_demo logger=none
    deepspeed --num_gpus 8 --module ava.train deepspeed=zero3 model=base
    torchrun --nproc_per_node 2 -m ava.train trainer.precision=fp32
    ava-train -m model.num_experts=4,8              # a Hydra sweep

Before Hydra parses anything: the `deepspeed` launcher's `--local_rank` is stripped and rank
0's launch time is shared through the launcher's key-value store, so every rank resolves the
same `${ava_now:}` run directory. The process group is created only once the configuration
has validated: config and data errors end the run with one clear message (exit code 2), never
a traceback and never a half-built process group.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ava import dist
from ava.config import ConfigError, conf_dir, register_configs
from ava.train import distributed, rundir

log = logging.getLogger("ava.train")


def _configure_rank_logging() -> None:
    """Rank 0 logs at INFO; the other ranks only warnings and errors."""
    level = logging.INFO if dist.rank() == 0 else logging.WARNING
    logging.getLogger("ava").setLevel(level)


def _fail(message: str) -> None:
    log.error("error: %s", message)
    sys.exit(2)


def _unknown_keys(node: Any, prefix: str = "") -> List[str]:
    """Keys that no schema declares. Hydra's `+key=value` force-adds even to a typed node, and
    `OmegaConf.to_object` then drops the key silently; a typo must fail instead."""
    found: List[str] = []
    if not isinstance(node, DictConfig):
        return found
    schema = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) \
        else None
    for key in node:
        path = f"{prefix}{key}"
        if names is not None and key not in names:
            found.append(f"{path} ({schema.__name__} has no field {key!r})")
        elif names is not None:
            found += _unknown_keys(node._get_node(key), f"{path}.")
    return found


def _open_dict_overrides(argv: List[str]) -> List[str]:
    """`deepspeed.overrides.<key>=v` -> `++deepspeed.overrides.<key>=v`: the overrides dict is
    open (any DeepSpeed key, nested or not), which Hydra's struct mode would otherwise refuse."""
    prefix = "deepspeed.overrides."
    return [f"++{a}" if a.startswith(prefix) and "=" in a else a for a in argv]


_TASK_ENTERED = False  # Hydra's own config errors end the process (exit 1) before the task


def train(cfg: DictConfig) -> Optional[float]:
    """The Hydra task: validate, agree on the run dir, train. Returns the last validation loss
    (what a Hydra sweeper would minimise)."""
    global _TASK_ENTERED
    _TASK_ENTERED = True
    from hydra.core.hydra_config import HydraConfig

    from ava.data import DataError, check_sources
    from ava.train.ds_compat import check_deepspeed
    from ava.train.init_from import apply_source, describe, open_source
    from ava.train.loop import fit
    from ava.train.plan import make_plan
    from ava.train.run import build_run
    from ava.train.signals import StopRequest

    unknown = _unknown_keys(cfg)
    if unknown:
        _fail("unknown config key(s): " + "; ".join(unknown))
    logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op-builder probes
    try:
        typed = OmegaConf.to_object(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    except MissingMandatoryValue as exc:
        _fail(f"Missing mandatory value: {exc.full_key} (give it a value in the YAML or on the "
              f"command line: {exc.full_key}=...)")
    except Exception as exc:  # OmegaConf wraps errors raised in __post_init__
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            _fail(str(cause))
        if isinstance(exc, OmegaConfBaseException):
            _fail(str(exc).splitlines()[0])
        raise
    source = None
    try:  # everything checkable without ranks talking: batch arithmetic, precision, lengths, paths
        if typed.init_from:
            source = open_source(typed.init_from)
            typed = apply_source(typed, source, list(HydraConfig.get().overrides.task))
        check_deepspeed()
        plan = make_plan(typed.trainer, typed.deepspeed, typed.model, dist.env_world_size())
        check_sources(typed.data)
    except (ConfigError, DataError) as exc:
        _fail(str(exc))
    distributed.init_distributed(typed.trainer.dist_timeout_s)
    _configure_rank_logging()
    run_dir = rundir.agree_on_run_dir(HydraConfig.get().runtime.output_dir)
    resolved: Any = OmegaConf.to_container(cfg, resolve=True)
    if source is not None:  # what the run really trains, and where it started (ava-export reads both)
        # the weights' sha256 is one full read of the file: rank 0 hashes it, the others receive it
        recorded = dist.broadcast_object(describe(source) if dist.rank() == 0 else None)
        resolved.update(model=dataclasses.asdict(typed.model), source=recorded)
        resolved["data"]["tokenizer"] = dataclasses.asdict(typed.data.tokenizer)
    try:
        # the handler is up before data preparation and stays up through the final save: a
        # SIGTERM at any point stops the run at the next step boundary, with a checkpoint
        with StopRequest() as stop:
            result = fit(build_run(typed, run_dir, plan=plan, resolved_config=resolved, stop=stop))
    except (ConfigError, DataError) as exc:
        _fail(str(exc))
    except RuntimeError as exc:
        if not distributed.is_lost_peer_error(exc):
            raise
        log.error("error: lost contact with another rank (%s). This rank stops too; rerun the "
                  "same command to resume from the last complete checkpoint (trainer.resume=auto)",
                  str(exc).splitlines()[0][:300])
        sys.exit(1)
    if result.preempted:
        sys.exit(result.exit_status)  # 130/143: stopped early, checkpoint complete; a sweep stops too
    return result.last_val_loss


def _rank_overrides(argv: List[str]) -> List[str]:
    """Non-zero ranks: no `.hydra/` copy and no log file of their own in the shared run dir."""
    extra = []
    if dist.env_rank() != 0:
        if not any(a.startswith("hydra.output_subdir=") for a in argv):
            extra.append("hydra.output_subdir=null")
        if not any(a.startswith("hydra/job_logging=") for a in argv):
            extra.append("hydra/job_logging=ava_rank")
    return extra


def with_rank_overrides(args: List[str]) -> List[str]:
    """`args` plus this rank's extra overrides, placed right after the user's overrides: Hydra's
    parser takes the overrides as one contiguous list (`-m a=1,2`, `--cfg job x=1`, `x=1 --cfg
    job` all stay valid). Unparseable args are left for Hydra to report."""
    extra = _rank_overrides(args)
    if not extra:
        return list(args)
    from hydra._internal.utils import get_args_parser

    try:
        overrides = get_args_parser().parse_args(args).overrides
    except SystemExit:
        return [*args, *extra]
    n = len(overrides)
    for i in range(len(args) - n, -1, -1):
        if n and args[i:i + n] == overrides:
            return [*args[:i + n], *extra, *args[i + n:]]
    return [*args, *extra]


def main() -> None:
    import hydra

    argv = distributed.strip_local_rank(sys.argv)
    rundir.register_time_resolver(rundir.agree_on_launch_time())
    sys.argv = [argv[0], *with_rank_overrides(_open_dict_overrides(argv[1:]))]
    register_configs()
    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(train)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 1 and not _TASK_ENTERED:  # Hydra rejected an override or a config file
            sys.exit(2)
        distributed.shutdown_and_exit(_exit_status(exc.code))
        raise
    distributed.shutdown_and_exit(0)


def _exit_status(code: Any) -> int:
    """The exit status of `sys.exit(code)`: Ava and Hydra exit with None or an int."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


if __name__ == "__main__":
    main()
