"""The entry point's command-line handling for non-zero ranks: the extra overrides land where
Hydra's parser accepts them, whatever the position of the user's flags."""

from __future__ import annotations

import pytest
from hydra._internal.utils import get_args_parser

from ava.train.cli import with_rank_overrides

EXTRA = ["hydra.output_subdir=null", "hydra/job_logging=ava_rank"]


@pytest.mark.parametrize("args", [
    [], ["x=1"], ["-m", "model.num_experts=4,8", "experiment=smoke"],
    ["--cfg", "job", "experiment=cpu_demo"], ["experiment=cpu_demo", "--cfg", "job"],
    ["x=1", "y=2", "--cfg", "job"], ["--cfg", "job"],
])
def test_rank_overrides_keep_the_command_line_parseable(monkeypatch, args):
    monkeypatch.setenv("RANK", "1")
    out = with_rank_overrides(args)
    parsed = get_args_parser().parse_args(out)  # exits (SystemExit) if argparse rejects it
    user = get_args_parser().parse_args(args).overrides
    assert parsed.overrides == [*user, *EXTRA]
    assert (parsed.cfg, parsed.multirun) == (get_args_parser().parse_args(args).cfg, "-m" in args)


def test_rank_zero_and_explicit_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert with_rank_overrides(["--cfg", "job", "x=1"]) == ["--cfg", "job", "x=1"]
    monkeypatch.setenv("RANK", "1")
    assert with_rank_overrides(["hydra.output_subdir=.h", "hydra/job_logging=none"]) == \
        ["hydra.output_subdir=.h", "hydra/job_logging=none"]
