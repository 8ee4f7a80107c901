"""Every command and code block of README.md runs, so the docs cannot drift from the code.

The README is parsed into its fenced blocks. Each shell command must appear in `COMMANDS` below,
which says how it runs here: as written, with a few overrides that shorten it (fewer steps, no
W&B, a scratch run directory), adapted where this 2-core CPU machine cannot run it as written
(a GPU launch; a 773M-parameter preset), or covered by a named test that runs it as written. A
README command missing from the table, or a table entry the README no longer has, fails the
test. Python blocks run as scripts and the YAML block is the inference config file that one
command reads. All run in one scratch directory, in README order, sharing `runs/my-run` (a
small Mixtral-compatible model trained for 500 steps, because the README's export examples
name `step_00000500` and the Mixtral layout) and `exports/my-model`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import yaml

from .conftest import REPO, free_port

FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
SHORT = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0", "logger=none",
         "trainer.progress_bar=false"]
NANO_MIXTRAL = ["model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false"]


@dataclass
class How:
    """How one README command runs in this test."""

    extra: List[str] = field(default_factory=list)  # appended arguments (shorter, scratch dirs)
    replace: Optional[Tuple[str, str]] = None  # (old, new) substitution, with the reason below
    covered_by: Optional[str] = None  # a test that runs exactly this command
    why: str = ""
    expect: str = ""  # a fragment the output must contain
    env: Dict[str, str] = field(default_factory=dict)
    in_repo: bool = False  # run in the repository (development commands), not the scratch dir


COMMANDS: Dict[str, How] = {
    # --- the two commands: run as written by test_main_job.py and by .ci/run
    "python3 -m venv .venv && . .venv/bin/activate && pip install -c .ci/constraints.txt -e "
    "'.[dev,hf]' && ava-train experiment=cpu_demo hydra.run.dir=runs/cpu_demo && ava-export "
    "runs/cpu_demo exports/cpu_demo --force && ava-generate exports/cpu_demo --prompt 'The "
    "Python language' --repetition-penalty 1.3": How(
        covered_by="tests/integration/test_main_job.py", why="2.5 minutes of training"),
    "python3 -m venv .venv && . .venv/bin/activate && pip install -c .ci/constraints.txt -e "
    "'.[dev,hf]' && python -m pytest": How(covered_by=".ci/run", why="the suite itself"),
    # --- Training
    "ava-train experiment=cpu_demo": How(covered_by="tests/integration/test_main_job.py"),
    # --- Start from an existing model: no hub checkpoint can be downloaded here; the same
    # commands run on checkpoints transformers saves in the tests
    "ava-train experiment=smoke init_from=/models/Qwen3-30B-A3B data=files 'data.sources=[{path: my.jsonl}]'":
        How(covered_by="tests/integration/test_init_from.py", why="a transformers-saved Qwen3-MoE, 2 ranks"),
    "ava-export runs/my-run out/qwen3-tuned": How(covered_by="tests/integration/test_init_from.py",
                                                  why="--layout auto back to qwen3_moe"),
    "ava-train init_from=/models/TinyLlama-1.1B upcycle.num_experts=8 upcycle.top_k=2": How(
        covered_by="tests/unit/hf/test_families.py", why="upcycling transformers' Llama and Qwen3"),
    "ava-generate /models/OLMoE-1B-7B --prompt 'def fib(n):'": How(
        covered_by="tests/unit/hf/test_families.py", why="every family as transformers saves it"),
    "ava-train experiment=smoke logger=none": How(extra=["trainer.max_steps=4"],
                                                   expect="saved checkpoint"),
    "ava-train model=small deepspeed=zero3 trainer.lr=3e-4 trainer.max_steps=20000": How(
        extra=["--cfg", "job"], expect="name: small",
        why="composes the config: a real step of the 283M preset took 32 s of this suite; the "
            "preset is built in tests/unit/model/test_presets.py and ZeRO-3 trains in "
            "tests/integration/test_zero_stages.py"),
    "ava-train --cfg job experiment=cpu_demo": How(expect="name: cpu_demo"),
    "ava-train -m model.num_experts=4,8 experiment=smoke": How(
        extra=SHORT[:-1], expect="#1 : model.num_experts=8"),
    "ava-train hydra.run.dir=runs/my_run trainer.resume=auto": How(
        extra=["experiment=smoke", *SHORT], why="the default tiny model in bf16 is slow on CPUs "
        "without native bf16; the smoke experiment shows the same resume path",
        expect="no complete checkpoint"),
    "NPROC=2 launch/train.sh experiment=smoke logger=none": How(
        extra=SHORT, expect="process group: gloo, 2 rank(s)"),
    "deepspeed --num_gpus 8 --module ava.train model=base deepspeed=zero3": How(
        replace=("--num_gpus 8", "--num_gpus 2"), extra=["--cfg", "job"],
        why="no GPU here: the same launch on 2 CPU ranks, composing the 773M preset's config",
        expect="hidden_size: 768", env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}),
    "torchrun --nproc_per_node 2 -m ava.train experiment=smoke": How(
        extra=SHORT, expect="done: step 2", env={"OMP_NUM_THREADS": "1"}),
    "torchrun --nproc_per_node 2 -m ava.train experiment=smoke model.activation=swiglu model.bias=false "
    "model.router_jitter=0 model.capacity_factor=null trainer.expert_parallel_size=2": How(
        extra=["--cfg", "job"], expect="expert_parallel_size: 2", env={"OMP_NUM_THREADS": "1"},
        why="composes the config on 2 ranks; tests/integration/test_expert_parallel.py trains with "
            "exactly these model and trainer settings (ep=2 vs ep=1, resume, export, ZeRO-3)"),
    "torchrun --nproc_per_node 2 -m ava.train experiment=smoke trainer.expert_parallel_size=2": How(
        extra=SHORT, expect="expert parallel (sharded): ep=2, rank 0 holds experts [0, 2) of 4",
        env={"OMP_NUM_THREADS": "1"}),
    "ava-bench ep --quick --out ep.json": How(covered_by="tests/integration/test_expert_parallel.py"),
    # --- Reports
    "ava-report runs/my-run": How(expect="runs/my-run/report.html"),
    # --- Data
    "ava-train data=files 'data.sources=[{path: /data/corpus/*.jsonl, text_field: text}]'":
        How(replace=("/data/corpus", "corpus"), extra=["experiment=smoke", *SHORT],
            why="a JSONL corpus made by this test", expect="data: 1 source(s): "),
    "ava-train data=jsonl_example 'data.sources=[{path: /data/corpus/*.jsonl, text_field: text}]'":
        How(replace=("/data/corpus", "corpus"), extra=["experiment=smoke", *SHORT],
            why="a JSONL corpus made by this test", expect="data: jsonl_example"),
    # --- Fine-tune on conversations
    "ava-train experiment=chat logger=none": How(extra=SHORT, expect="chat template from built-in ChatML"),
    "ava-train experiment=chat init_from=/models/Qwen3-30B-A3B data=chat_files "
    "'data.sources=[{path: /data/chats/*.jsonl}]'": How(
        covered_by="tests/integration/test_init_from.py", why="a transformers-saved Qwen3-MoE on chats, 2 ranks"),
    "ava-export 'outputs/<run>' out/qwen3-chat": How(covered_by="tests/integration/test_init_from.py",
                                                     why="the export keeps the chat template"),
    # --- Export (runs/my-run is set up by the fixture)
    "ava-export runs/my-run exports/my-model": How(expect="exports/my-model"),
    "ava-export runs/my-run/checkpoints/step_00000500 out/step500": How(expect="out/step500"),
    "ava-export runs/my-run out/mixtral-bf16 --layout mixtral --dtype bf16 --max-shard-size 500MB":
        How(expect="out/mixtral-bf16"),
    # --- Inference
    "ava-generate exports/my-model --prompt 'The Python language' --max-new-tokens 60": How(
        expect="The Python language"),
    "ava-generate exports/my-model --prompt def --prompt import --sample --temperature 0.8 "
    "--top-p 0.9 --seed 1": How(expect="import"),
    "ava-generate exports/my-model --prompt 'The Python language' --min-new-tokens 40 --ignore-eos "
    "--max-new-tokens 80": How(expect="The Python language"),
    "ava-generate --config infer.yaml --prompt Hello": How(expect="Hello"),
    # --- Performance: the same flags, fewer repeats where a flag allows
    "ava-bench moe --quick --out moe.json": How(
        covered_by="tests/unit/bench/test_cli.py", why="run there with --warmup 0 --repeats 1"),
    "ava-bench train --quick --out train.json": How(covered_by="tests/unit/bench/test_cli.py"),
    "ava-bench train --out train.json": How(covered_by="tests/unit/bench/test_cli.py",
                                            why="the same code path at --quick's sizes; the preset takes ~11 min"),
    "ava-bench train --reduced --compile": How(covered_by="tests/unit/bench/test_cli.py",
                                               why="--compile at --quick's sizes; this takes 1-5 min"),
    "ava-bench gpu --dry-run --out gpu.json": How(covered_by="tests/unit/bench/test_gpu_bench.py",
                                                  why="run there with --threads 1 and a scratch --workdir"),
    # --- Development
    "ruff check .": How(expect="All checks passed!", in_repo=True),
    "python -m pytest tests/unit": How(covered_by=".ci/run", why="the suite itself"),
    "DS_ACCELERATOR=cpu python -m pytest tests/integration": How(covered_by=".ci/run",
                                                                 why="the suite itself"),
}


def readme_blocks() -> List[Tuple[str, str]]:
    """(language, dedented text) of every fenced block, in order."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for match in FENCE.finditer(text):
        indent = len(match.group(1))
        body = "".join(line[indent:] for line in match.group(3).splitlines(keepends=True))
        blocks.append((match.group(2), body))
    return blocks


def commands(block: str) -> List[str]:
    """The commands of a shell block, comments dropped, in canonical `shlex` form."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(" ".join(shlex.quote(w) if w not in ("&&",) else w for w in words))
    return out


def readme_commands() -> List[str]:
    return [c for lang, body in readme_blocks() if lang == "bash" for c in commands(body)]


def test_every_readme_command_is_exercised_and_the_table_is_current():
    found = readme_commands()
    missing = [c for c in found if c not in COMMANDS]
    assert not missing, f"README commands this test does not run (add them to COMMANDS): {missing}"
    stale = [c for c in COMMANDS if c not in found]
    assert not stale, f"COMMANDS entries the README no longer has: {stale}"
    langs = {lang for lang, _ in readme_blocks()}
    assert langs <= {"", "bash", "python", "yaml"}, langs  # "" is the data-flow picture


def test_readme_test_command_is_what_ci_runs():
    ci_lines = [c for c in commands((REPO / ".ci" / "run").read_text())
                if c.startswith("python3 -m venv")]
    test_command = next(c for c in COMMANDS if c.endswith("python -m pytest"))
    assert ci_lines == [test_command]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch directory with what the README's examples name: `runs/my-run` (step 500 of a
    Mixtral-compatible nano model), a JSONL corpus, and the venv's tools on PATH."""
    work = tmp_path_factory.mktemp("readme")
    (work / "corpus").mkdir()
    rows = [f'{{"text": "Example {i}: the river runs past the old stone tower."}}' for i in range(300)]
    (work / "corpus" / "part0.jsonl").write_text("\n".join(rows) + "\n")
    run(work, "ava-train experiment=smoke " + " ".join([
        *NANO_MIXTRAL, "trainer.max_steps=500", "trainer.save_every=500", "trainer.eval_every=0",
        "trainer.log_every=100", "trainer.progress_bar=false", "hydra.run.dir=runs/my-run"]))
    return work


def env_for(work: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {**os.environ, "AVA_CACHE": str(work / "cache"), "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **(extra or {})}
    env.pop("WANDB_API_KEY", None)
    return env


def run(work: Path, command: str, env: Optional[Dict[str, str]] = None,
        cwd: Optional[Path] = None) -> str:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd or work, env=env_for(work, env),
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`{command}` failed (rc={proc.returncode}):\n{output[-5000:]}"
    return output


def as_run_here(command: str, how: How, work: Path) -> str:
    if how.replace:
        assert how.replace[0] in command
        command = command.replace(*how.replace)
    if command.startswith("NPROC=2 launch/train.sh"):
        command = f"MASTER_PORT={free_port()} {command.replace('launch/', f'{REPO}/launch/')}"
    if "--master_port" not in command and command.startswith(("deepspeed", "torchrun")):
        flag = "--master_port" if command.startswith("deepspeed") else "--master-port"
        first, rest = command.split(" ", 1)
        command = f"{first} {flag} {free_port()} {rest}"
    extra = list(how.extra)
    if command.startswith(("ava-train", "NPROC", "MASTER_PORT", "deepspeed", "torchrun")) \
            and "hydra.run.dir" not in command and "--cfg" not in extra and " -m " not in command:
        extra.append(f"hydra.run.dir={work}/runs/{abs(hash(command)) % 10**8}")
    if " -m model" in command:
        extra.append(f"hydra.sweep.dir={work}/multirun/readme")
    return " ".join([command, *map(shlex.quote, extra)])


@pytest.mark.slow
def test_readme_blocks_run_in_order(workdir):
    """Every runnable block, in README order: shell commands (as `COMMANDS` says), Python blocks
    as scripts, the YAML block as `infer.yaml`."""
    yaml_blocks = [body for lang, body in readme_blocks() if lang == "yaml"]
    assert len(yaml_blocks) == 1
    infer = yaml.safe_load(yaml_blocks[0])
    assert infer["model"] == "exports/my-model"
    (workdir / "infer.yaml").write_text(yaml_blocks[0])
    ran = []
    for lang, body in readme_blocks():
        if lang == "python":
            start = time.perf_counter()
            out = run(workdir, f"{shlex.quote(sys.executable)} - <<'PY'\n{body}PY")
            print(f"{time.perf_counter() - start:6.1f}s  python block {body.splitlines()[0]}")
            ran.append(("python", out))
            continue
        if lang != "bash":
            continue
        for command in commands(body):
            how = COMMANDS[command]
            if how.covered_by:
                assert (REPO / how.covered_by).is_file(), how.covered_by
                continue
            start = time.perf_counter()
            out = run(workdir, as_run_here(command, how, workdir), how.env,
                      cwd=REPO if how.in_repo else None)
            print(f"{time.perf_counter() - start:6.1f}s  {command}")
            assert how.expect in out, f"{how.expect!r} not in the output of `{command}`:\n{out[-3000:]}"
            ran.append((command, out))
    commands_run = [c for c, _ in ran if c != "python"]
    assert len(commands_run) == sum(1 for h in COMMANDS.values() if not h.covered_by)
    assert sum(1 for c, _ in ran if c == "python") == 2
    assert (workdir / "out" / "mixtral-bf16" / "config.json").is_file()
    assert len(list((workdir / "multirun" / "readme").glob("[01]"))) == 2
