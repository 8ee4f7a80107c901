"""Integration fixtures: a small corpus, a shared token cache, and runners that launch real
training processes (plain `python -m ava.train`, the `deepspeed` launcher, `torchrun`) on CPU.

Runs default to `torchrun` (its start-up is ~4.6 s shorter than the `deepspeed` launcher's, which
adds up over ~50 launches); tests about the `deepspeed` launcher itself ask for it by name.
Every run uses the nano model on a synthetic corpus with `data.seq_len=32`, fp32, gloo and
`logger=none`, so a 2-rank run takes ~15 s once DeepSpeed's CPU comm op is built (the first
multi-rank run in a fresh environment builds it, ~60-110 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300

WORDS = (  # noqa: SIM905 (a word list reads better as prose)
    "the a one every some river stone garden window tower market lantern story engine "
    "number letter bridge forest cloud city teacher sailor painter doctor child bird "
    "walks reads builds finds carries opens watches paints writes counts follows "
    "quickly slowly quietly early late often never always near under over across "
    "red green small old bright heavy gentle curious silent distant"
).split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS[:4]), rng.choice(WORDS[4:26]), rng.choice(WORDS[26:37]),
             rng.choice(WORDS[:4]), rng.choice(WORDS[53:]), rng.choice(WORDS[4:26])]
    if rng.random() < 0.5:
        words += [rng.choice(WORDS[37:45]), rng.choice(WORDS[45:53]), "the",
                  rng.choice(WORDS[4:26])]
    return " ".join(words).capitalize() + "."


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~400 paragraphs of a tiny synthetic language (blank-line separated documents)."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    paragraphs = [" ".join(_sentence(rng) for _ in range(rng.randint(3, 8))) for _ in range(400)]
    path = root / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


BAD_CHATS = 2  # records of the chat corpus that validation must skip and count


@pytest.fixture(scope="session")
def chat_corpus(corpus: Path) -> Path:
    """Conversations in the same language (JSONL, `messages`): the user says a paragraph's first
    sentence, the assistant the rest; every third with a system prompt, every fourth two turns;
    and BAD_CHATS bad records (no assistant turn, an unknown role)."""
    records = []
    for i, paragraph in enumerate(corpus.read_text().split("\n\n")):
        first, _, rest = paragraph.strip().partition(". ")
        messages = [{"role": "user", "content": first + "."}, {"role": "assistant", "content": rest or first}]
        if i % 4 == 0:
            messages += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": first + "."}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Continue the story."})
        records.append({"messages": messages})
    records[10] = {"messages": [{"role": "user", "content": "Nobody answers."}]}
    records[20] = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = corpus.parent / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ava_cache")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: Path

    def metrics(self) -> List[Dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def losses(self) -> Dict[int, float]:
        """step -> train/loss (the last record per step, as a resumed run appends)."""
        return {r["step"]: r["train/loss"] for r in self.metrics() if "train/loss" in r}

    def check(self) -> Run:
        assert self.returncode == 0, f"training failed (rc={self.returncode}):\n{self.output[-6000:]}"
        return self


class Trainer:
    """Builds the command line for one training run and runs it to completion."""

    def __init__(self, corpus: Path, cache: Optional[Path], conf_dir: Path) -> None:
        self.corpus = corpus  # cache None: data.cache_dir keeps its default (AVA_CACHE, per node)
        self.cache = cache
        self.conf_dir = conf_dir

    def base_overrides(self) -> List[str]:
        # the corpus comes in through a data YAML on Hydra's search path, not a `{...}` override:
        # Hydra 1.3's override parser misreads dict values under `python -O` (test_faults.py)
        cache = [f"data.cache_dir='{self.cache}'"] if self.cache is not None else []
        return [
            "experiment=smoke", "logger=none", f"hydra.searchpath=[file://{self.conf_dir}]",
            "data=itest", *cache, "data.seq_len=32", "data.val_fraction=0.05", "trainer.precision=fp32",
            "trainer.progress_bar=false", "trainer.log_every=1",
        ]

    def env(self, nproc: int) -> Dict[str, str]:
        env = dict(os.environ)
        env.update({"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if nproc > 1 else "2"})
        env.pop("AVA_RUN_TIME", None)
        return env

    def command(self, overrides: Sequence[str], *, nproc: int, launcher: str) -> List[str]:
        flags = [a for a in overrides if a in ("-m", "--multirun")]  # before the overrides
        args = [*flags, *self.base_overrides(), *(a for a in overrides if a not in flags)]
        if launcher == "python":
            return [sys.executable, "-m", "ava.train", *args]
        self.last_port = free_port()
        if launcher == "deepspeed":  # no --no_local_rank: the entry point must strip it
            return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
                    "--master_port", str(self.last_port), "--module", "ava.train", *args]
        if launcher == "torchrun":
            return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node",
                    str(nproc), "--master_port", str(self.last_port), "-m", "ava.train", *args]
        raise ValueError(launcher)

    @staticmethod
    def free_port() -> int:
        return free_port()

    @staticmethod
    def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int) -> None:
        """Block until a running training has logged `steps` steps; fail if it ended before."""
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
                return
            time.sleep(0.2)
        output = proc.communicate()[0] if proc.poll() is not None else "(still running)"
        pytest.fail(f"training did not reach step {steps}:\n{output[-6000:]}")

    def start(self, run_dir: Optional[Path], overrides: Sequence[str] = (), *, nproc: int = 2,
              launcher: str = "torchrun", cwd: Optional[Path] = None,
              extra_env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        extra = [f"hydra.run.dir='{run_dir}'"] if run_dir is not None else []
        env = {**self.env(nproc), **(extra_env or {})}
        return subprocess.Popen(self.command([*extra, *overrides], nproc=nproc, launcher=launcher),
                                cwd=cwd or REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def run(self, run_dir: Optional[Path], overrides: Sequence[str] = (), *, nproc: int = 2,
            launcher: str = "torchrun", cwd: Optional[Path] = None,
            extra_env: Optional[Dict[str, str]] = None) -> Run:
        proc = self.start(run_dir, overrides, nproc=nproc, launcher=launcher, cwd=cwd,
                          extra_env=extra_env)
        try:
            output, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            pytest.fail(f"training timed out after {TIMEOUT_S}s:\n{output[-6000:]}")
        return Run(proc.returncode, output, run_dir or Path("."))


@pytest.fixture(scope="session")
def extra_conf(corpus: Path, chat_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config directory on Hydra's search path holding `data/itest.yaml` (the corpus) and
    `data/ichat.yaml` (the conversations)."""
    root = tmp_path_factory.mktemp("conf")
    (root / "data").mkdir()
    (root / "data" / "itest.yaml").write_text(
        "defaults:\n  - base_data\n  - _self_\n\nname: itest\n"
        f"sources:\n  - path: '{corpus}'\n")
    (root / "data" / "ichat.yaml").write_text(
        "defaults:\n  - base_data\n  - _self_\n\nname: ichat\nkind: chat\n"
        f"sources:\n  - path: '{chat_corpus}'\n")
    (root / "data" / "missing.yaml").write_text(  # a typo in a path (test_entry_point.py)
        "defaults:\n  - base_data\n  - _self_\n\nname: missing\n"
        f"sources:\n  - path: '{corpus.parent / 'no_such_dir' / 'corpus.txt'}'\n")
    return root


@pytest.fixture(scope="session")
def trainer(corpus: Path, data_cache: Path, extra_conf: Path) -> Trainer:
    return Trainer(corpus, data_cache, extra_conf)
