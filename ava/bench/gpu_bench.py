"""`ava-bench gpu`: the one-shot GPU measurement, in one call of under 8 minutes on one H100/H200.

Four parts, each in a process of its own under a time cap of its own:

- `moe`: one MoE layer, forward + backward (`ava.bench.moe_bench` at `gpu_sweep()`): Ava (its
  `auto` backend and the grouped kernel forced), `transformers`' Mixtral block (grouped and eager
  experts), a dense MLP of the same active FLOPs (the upper bound) and a raw matmul of them;
- `train`: the `base` preset's training step against `MixtralForCausalLM` of the same weights
  (`ava.bench.train_bench`), MFU against the device's dense bf16 peak;
- `train_compiled`: Ava's step eager beside a copy with its blocks compiled (`trainer.compile`);
- `main_job`: a few steps of the README's main job (`ava-train experiment=cpu_demo`) on one GPU
  under DeepSpeed ZeRO-2 in bf16, launched as `python -m ava.train`.

A part that raises, crashes or outlives its cap becomes a row with its error, and the next part
still runs, in a fresh process (a clean GPU). `--dry-run` runs the same code at tiny sizes, on a
CPU where there is no GPU (the unit test).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

PARTS = ("moe", "train", "train_compiled", "main_job")
# Wall-clock caps per part, 450 s in all: with the parent's start-up and the table, one call stays
# under the 8 minutes it is given. The compiled step gets the most (compiling 18 blocks' forward
# and backward), the main job enough for DeepSpeed to JIT-build its fused Adam on first use.
CAPS_S = {"moe": 80, "train": 100, "train_compiled": 120, "main_job": 150}
CHILD_MARGIN_S = 5  # a child stops starting new work this long before its cap
MOE_IMPLS = ("ava", "ava_grouped", "dense", "roofline", "hf", "hf_eager")
TRAIN_PRESET = "base"
# `base` is the architecture document's block (LayerNorm, GELU experts with biases), which
# MixtralForCausalLM cannot express: its MFU is Ava's alone, and the side-by-side step runs the
# same dimensions in Mixtral's form against the peer's default grouped experts
MIXTRAL_FORM = {"norm": "rmsnorm", "activation": "swiglu", "bias": False}
TRAIN_PEERS = ("hf",)
# bf16 on the GPU at a real batch; 8 x 2048 tokens keeps two 1.2B-parameter models (Ava's and
# the peer's, with AdamW states) and one step's activations well inside an H100's 80 GB
TRAIN_GPU = {"batch": 8, "seq_len": 2048, "warmup": 2, "steps": 8}
TRAIN_TINY = {"batch": 2, "seq_len": 32, "warmup": 1, "steps": 2}  # at train_bench.QUICK's dimensions
MAIN_JOB_STEPS = 30  # on a GPU: past the first steps' allocations and kernel choices
MAIN_JOB_TIMED_FROM = 5  # steps before this one (1-based) are left out of the medians
# the main job shrunk for the dry run: one narrow layer, short blocks, 3 steps
MAIN_JOB_TINY = ["model.num_layers=1", "model.hidden_size=64", "model.num_heads=2", "model.ffn_size=128",
                 "model.max_seq_len=32", "data.seq_len=32", "trainer.micro_batch_size=2",
                 "trainer.eval_batches=1", "trainer.max_steps=3"]
MAIN_JOB_RETRY_MIN_S = 60  # after a failed attempt, retry with torch's AdamW only if this much time is left
ENGINE_LINE = re.compile(r"DeepSpeed engine: ZeRO stage (\d), (\w+), optimizer (\w+) \((\w+)\)")
# versions recorded with the results: what the wheel bundle brings and what it meets on the machine
PACKAGES = ("deepspeed", "hydra-core", "omegaconf", "datasets", "pydantic", "typing-extensions", "fsspec",
            "pyarrow", "huggingface-hub", "transformers", "tokenizers", "triton")
ERROR_CHARS = 600  # of an error's text kept in the table (the JSON keeps the traceback)


@dataclass(frozen=True)
class Settings:
    """What every part's process is told (written as JSON, read by the child)."""

    device: str  # "cuda" or "cpu"
    dtype: str  # "bf16" or "fp32"
    dry_run: bool
    seed: int
    threads: Optional[int]
    workdir: str  # the main job's run directory and data cache, the parts' logs

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


# ---------------------------------------------------------------- the parts (in their process)

def _moe(s: Settings, deadline: float, save: Callable[[dict], None]) -> dict:
    """The sweep, point by point; a point that fails (out of memory, say) is a row with its error.
    A point starts only while twice the slowest point so far still fits before the deadline."""
    import torch

    from ava.bench import moe_bench

    device, dtype = torch.device(s.device), s.torch_dtype
    points = moe_bench.quick_sweep() if s.dry_run else moe_bench.gpu_sweep()
    warmup, repeats = (0, 1) if s.dry_run else (2, 5)
    rows: list[dict] = []
    slowest = 0.0
    for i, pt in enumerate(points, 1):
        left = deadline - time.monotonic()
        if left < 2 * slowest:
            rows.append({"label": pt.label, "point": asdict(pt),
                         "status": f"skipped: {left:.0f} s left, the slowest point took {slowest:.0f} s"})
            continue
        print(f"[moe {i}/{len(points)}] {pt.label}", flush=True)
        start = time.monotonic()
        try:
            row = {**moe_bench.run_point(pt, warmup=warmup, repeats=repeats, device=device, impls=MOE_IMPLS,
                                         seed=s.seed, dtype=dtype), "status": "ok"}
        except Exception as exc:  # reported; the next points still run
            row = {"label": pt.label, "point": asdict(pt), "status": _error(exc)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        slowest = max(slowest, time.monotonic() - start)
        rows.append(row)
        save({"status": "running", "points": rows})
    ok = [r for r in rows if r["status"] == "ok"]
    return {"status": "ok" if len(ok) == len(rows) else f"partial: {len(ok)} of {len(rows)} points ran",
            "dtype": s.dtype, "warmup": warmup, "repeats": repeats, "impls": list(MOE_IMPLS),
            "agree_tol": moe_bench.agree_tol(dtype), "points": rows, "targets": moe_bench.targets(ok)}


def _train(s: Settings, deadline: float, save: Callable[[dict], None], compiled: bool) -> dict:
    """The `base` preset's step (tiny in a dry run): Ava eager, then the same dimensions in
    Mixtral's form beside `TRAIN_PEERS`, while there is time (what ran is saved after each); or
    (`compiled`) Ava eager beside its copy with each block compiled, in the same process."""
    import torch

    from ava.bench import train_bench

    dtype = s.torch_dtype
    size = TRAIN_TINY if s.dry_run else TRAIN_GPU
    base = train_bench.QUICK if s.dry_run else {}
    plans = [("base", base, ())] + ([] if compiled else [("base as Mixtral", {**base, **MIXTRAL_FORM}, TRAIN_PEERS)])
    runs: list[dict] = []
    for label, overrides, peers in plans:
        # the side-by-side run holds two models: about twice the time of the run before it
        if runs and time.monotonic() + 2 * runs[-1]["seconds"] > deadline:
            runs.append({"label": label, "status": "skipped: not enough time left in the part's cap"})
            continue
        start = time.monotonic()
        try:
            payload = train_bench.run_train(
                TRAIN_PRESET, batch=size["batch"], seq_len=size["seq_len"], steps=size["steps"],
                warmup=size["warmup"], device=torch.device(s.device), dtype=dtype, overrides=overrides,
                seed=s.seed, peers=peers, compile=compiled)
            runs.append({"label": label, "status": "ok", **payload})
        except Exception as exc:  # out of memory, say: reported, and the next run still tries
            runs.append({"label": label, "status": _error(exc), "traceback": traceback.format_exc()[-4000:]})
        runs[-1]["seconds"] = time.monotonic() - start
        if s.device == "cuda":
            torch.cuda.empty_cache()
        save({"status": "running", "runs": runs})
    ok = sum(r["status"] == "ok" for r in runs)
    return {"status": "ok" if ok == len(runs) else f"partial: {ok} of {len(runs)} runs", "runs": runs}


PART_FUNCTIONS: dict[str, Callable[[Settings, float, Callable[[dict], None]], dict]] = {
    "moe": _moe,
    "train": lambda s, deadline, save: _train(s, deadline, save, compiled=False),
    "train_compiled": lambda s, deadline, save: _train(s, deadline, save, compiled=True),
}


def child_main(argv: Sequence[str]) -> int:
    """`python -m ava.bench.gpu_bench PART SETTINGS.json RESULT.json CAP_S`: one part, its result
    written to RESULT.json (also as it goes, so a part stopped at its cap leaves what it had)."""
    part, settings_path, result_path, cap = argv
    deadline = time.monotonic() + float(cap) - CHILD_MARGIN_S
    s = Settings(**json.loads(Path(settings_path).read_text()))
    from ava.bench.cli import quiet

    quiet()
    import torch

    if s.threads:
        torch.set_num_threads(s.threads)

    def save(result: dict) -> None:
        tmp = Path(result_path).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str))
        tmp.replace(result_path)

    try:
        result = PART_FUNCTIONS[part](s, deadline, save)
    except Exception as exc:  # what the part saved so far is kept beside the error
        saved = json.loads(Path(result_path).read_text()) if Path(result_path).is_file() else {}
        save({**saved, "status": _error(exc), "traceback": traceback.format_exc()[-4000:]})
        return 1
    save(result)
    return 0


# ---------------------------------------------------------------- the parent: one part after another

def _error(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {exc}"[:ERROR_CHARS]


def _child_env(s: Settings) -> dict[str, str]:
    """This process's environment, with the directory Ava was imported from first on the path (so
    every child runs this tree) and unbuffered output (progress appears as it happens)."""
    import ava

    root = str(Path(ava.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    if s.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _run_capped(cmd: list[str], cap: float, env: dict[str, str], log: Path, tee: bool) -> Optional[int]:
    """Run `cmd` for at most `cap` seconds, its output to `log` (and to this stdout with `tee`);
    its exit code, or None when it was stopped at the cap. The child leads a process group of
    its own, so what it started (compile workers, data builders) is stopped with it."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if tee else out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        copier = None
        if tee:
            def copy() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    print(line, end="", flush=True)
                    out.write(line)

            copier = threading.Thread(target=copy, daemon=True)
            copier.start()
        try:
            return proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        finally:
            if copier is not None:
                copier.join(timeout=5)


def _tail(path: Path, chars: int = ERROR_CHARS) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return " | ".join(line.strip() for line in text[-chars:].splitlines() if line.strip())


def _in_child(part: str, s: Settings, cap: float) -> dict:
    work = Path(s.workdir)
    settings_path, result_path, log = work / "settings.json", work / f"{part}.json", work / f"{part}.log"
    settings_path.write_text(json.dumps(asdict(s)))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ava.bench.gpu_bench", part, str(settings_path), str(result_path), str(cap)]
    code = _run_capped(cmd, cap, _child_env(s), log, tee=True)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if code is None:
        result["status"] = f"timed out: stopped at its {cap:g} s cap" + (
            " (the rows it finished are kept)" if result else "")
    elif code != 0 and not str(result.get("status", "")).startswith("failed"):
        result["status"] = f"failed: exit {code}: {_tail(log)}"
    return result


def main_job_overrides(s: Settings, run_dir: Path, optimizer: str) -> list[str]:
    """`ava-train experiment=cpu_demo` on one device: ZeRO-2, `s.dtype`, no W&B, a log line per
    step, a checkpoint only at the end; shrunk (`MAIN_JOB_TINY`) in a dry run."""
    steps = [] if s.dry_run else [f"trainer.max_steps={MAIN_JOB_STEPS}"]
    return ["experiment=cpu_demo", "logger=none", "deepspeed=zero2", f"trainer.precision={s.dtype}",
            f"trainer.optimizer_impl={optimizer}", "trainer.log_every=1", "trainer.progress_bar=false",
            "trainer.save_every=0", f"hydra.run.dir='{run_dir}'", *steps, *(MAIN_JOB_TINY if s.dry_run else [])]


def summarise_main_job(run_dir: Path, log_text: str) -> dict:
    """Steps, losses, median step time, tokens/s, TFLOP/s and MFU (the trainer's own metrics),
    and what the engine really ran: the status is a failure unless it was ZeRO-2 in `dtype`."""
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    steps = [r for r in records if "train/loss" in r]
    engine = ENGINE_LINE.search(log_text)
    out: dict[str, Any] = {"steps": len(steps), "run_dir": str(run_dir)}
    if engine:
        out["engine"] = {"zero_stage": int(engine.group(1)), "precision": engine.group(2),
                         "optimizer": engine.group(3), "optimizer_impl": engine.group(4)}
    if steps:
        timed = [r for r in steps if r["step"] >= MAIN_JOB_TIMED_FROM] or steps
        out.update(loss_first=steps[0]["train/loss"], loss_last=steps[-1]["train/loss"],
                   step_ms=statistics.median(r["perf/step_time_s"] for r in timed) * 1e3,
                   tokens_per_s=statistics.median(r["perf/tokens_per_s"] for r in timed), timed_steps=len(timed))
        for key, name in (("perf/tflops_per_device", "tflops"), ("perf/mfu", "mfu")):
            if all(key in r for r in timed):
                out[name] = statistics.median(r[key] for r in timed)
        peaks = [r["mem/cuda_peak_gb"] for r in steps if "mem/cuda_peak_gb" in r]
        if peaks:
            out["cuda_peak_gb"] = max(peaks)
    out["checkpoints"] = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) \
        if (run_dir / "checkpoints").is_dir() else []
    return out


def _main_job(s: Settings, cap: float) -> dict:
    """The main job as its own process (`python -m ava.train`). On a GPU it runs with the default
    optimizer (DeepSpeed's fused Adam, JIT-built on first use); if that attempt fails and time is
    left, once more with torch's AdamW, so a broken op build still leaves a ZeRO-2 measurement."""
    deadline = time.monotonic() + cap
    attempts: list[dict] = []
    for optimizer in ("auto", "torch") if s.device != "cpu" else ("auto",):
        left = deadline - time.monotonic()
        if attempts and left < MAIN_JOB_RETRY_MIN_S:
            break
        run_dir = Path(s.workdir) / f"main_job_{optimizer}"
        log = Path(s.workdir) / f"main_job_{optimizer}.log"
        cmd = [sys.executable, "-m", "ava.train", *main_job_overrides(s, run_dir, optimizer)]
        env = {**_child_env(s), "AVA_CACHE": str(Path(s.workdir) / "cache"), "WANDB_MODE": "disabled"}
        print(f"[main_job] {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        code = _run_capped(cmd, left, env, log, tee=False)
        summary = summarise_main_job(run_dir, log.read_text(errors="replace"))
        summary.update(optimizer_impl_asked=optimizer, seconds=time.monotonic() - start)
        engine = summary.get("engine", {})
        if code is None:
            summary["status"] = f"timed out: stopped after {left:.0f} s"
        elif code != 0:
            summary["status"] = f"failed: exit {code}: {_tail(log)}"
        elif (engine.get("zero_stage"), engine.get("precision")) != (2, s.dtype):
            summary["status"] = f"failed: the engine ran {engine or 'unknown'}, not ZeRO-2 {s.dtype}"
        else:
            summary["status"] = "ok"
        attempts.append(summary)
        print(f"[main_job] {optimizer}: {summary['status']}", flush=True)
        if summary["status"] == "ok":
            break
    last = attempts[-1]
    return {**last, "attempts": attempts}


def run(s: Settings, parts: Sequence[str], caps: Optional[dict[str, float]] = None) -> dict:
    """Each part under its cap (`CAPS_S`), in order; the payload `ava-bench gpu` writes and tabulates."""
    import torch

    from ava.bench import table as tbl
    from ava.bench.train_bench import peak_flops

    started = time.monotonic()
    device = torch.device(s.device)
    results: dict[str, dict] = {}
    for part in parts:
        cap = (caps or CAPS_S)[part]
        print(f"[{part}] started (cap {cap} s)", flush=True)
        start = time.monotonic()
        try:
            result = _main_job(s, cap) if part == "main_job" else _in_child(part, s, cap)
        except Exception as exc:  # the harness itself: still a row, and the next part runs
            result = {"status": _error(exc), "traceback": traceback.format_exc()[-4000:]}
        result.update(seconds=time.monotonic() - start, cap_s=cap)
        results[part] = result
        print(f"[{part}] {result['status']} ({result['seconds']:.0f} s)", flush=True)
    payload = {
        "benchmark": "gpu", "dry_run": s.dry_run, "dtype": s.dtype, "dtype_note": dtype_note(s),
        "environment": tbl.environment(device, torch.get_num_threads()),
        "packages": tbl.versions(PACKAGES), "peak_flops": peak_flops(device), "workdir": s.workdir, "parts": results,
        "seconds": time.monotonic() - started,
    }
    payload["rows"] = rows(payload)
    return payload


def dtype_note(s: Settings) -> str:
    if s.device != "cpu":
        return f"{s.dtype} on {s.device}"
    from ava.train.plan import cpu_has_native_bf16

    native = "native on this CPU (AVX512-BF16/AMX)" if cpu_has_native_bf16() else \
        "emulated on this CPU (no AVX512-BF16/AMX): slow at real sizes, seconds at these"
    return f"dry run on the CPU in {s.dtype}" + (f"; bf16 is {native}" if s.dtype == "bf16" else "")


# ---------------------------------------------------------------- the table's rows

def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def _row(part: str, label: str, *, ms: Optional[float] = None, tokens_per_s: Optional[float] = None,
         flops_per_s: Optional[float] = None, mfu: Optional[float] = None, vs_transformers: Optional[float] = None,
         notes: str = "") -> dict:
    return {"part": part, "row": label, "ms": ms, "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s,
            "mfu": mfu, "vs_transformers": vs_transformers, "notes": notes}


def _moe_rows(result: dict, peak: Optional[float]) -> list[dict]:
    out = []
    for p in result.get("points", []):
        if p["status"] != "ok":
            out.append(_row("moe", p["label"], notes=p["status"]))
            continue
        res = p["results"]
        ava = res["ava"]
        ms = {n: r["median_ms"] for n, r in res.items() if "median_ms" in r}
        flops = p["flops"] / (ava["median_ms"] / 1e3)
        agree = " ".join(f"{n}{'✓' if r['agrees'] else '✗'}" for n, r in res.items() if "agrees" in r)
        notes = ", ".join(f"{n} {v:.2f}" for n, v in ms.items() if n != "ava")
        if "ava_over_dense_time" in p["summary"]:
            notes += f"; ava/dense {p['summary']['ava_over_dense_time']:.2f}"
        out.append(_row("moe", p["label"], ms=ava["median_ms"], tokens_per_s=ava["tokens_per_s"], flops_per_s=flops,
                        mfu=_ratio(flops, peak), vs_transformers=_ratio(ms.get("hf"), ava["median_ms"]),
                        notes=f"ms: {notes}; agree: {agree or '—'}"))
    return out


def _train_rows(part: str, result: dict) -> list[dict]:
    out = []
    for run in result.get("runs", []):
        if run["status"] != "ok":
            out.append(_row(part, run["label"], notes=run["status"]))
            continue
        hf = run["results"].get("hf", {}).get("tokens_per_s")
        for name, r in run["results"].items():
            compiled = name.endswith("_compiled")
            if r.get("status") != "ok" or (part == "train_compiled") != compiled:
                continue  # a peer this run does not have; the eager step the compiled one is set against
            peer = f"MixtralForCausalLM ({'eager' if name == 'hf_eager' else 'grouped'})"
            who = "Ava" if name.startswith("ava") else peer
            label = f"{run['label']} {'compiled' if compiled else 'eager'}: {who}"
            notes = (f"{run['dims']}, {run['batch']}x{run['seq_len']} tokens; fwd {r['forward_ms']:.0f} bwd "
                     f"{r['backward_ms']:.0f} opt {r['optimizer_ms']:.0f} ms; peak {r['peak_step_bytes'] / 2**20:,.0f} "
                     f"MiB; loss@0 {r['loss_step0']:.4f}; {r['matmul_fraction']:.0%} of a 2048³ matmul")
            if compiled:
                notes += f"; compiling took {r['compile_s']:.1f} s; {r['speedup_vs_eager']:.2f}x eager Ava"
            out.append(_row(part, label, ms=r["step_ms"], tokens_per_s=r["tokens_per_s"], flops_per_s=r["flops_per_s"],
                            mfu=r.get("mfu"), vs_transformers=_ratio(r["tokens_per_s"], hf) if name == "ava" else None,
                            notes=notes))
    return out


def _main_job_row(result: dict) -> dict:
    engine = result.get("engine", {})
    label = f"main job cpu_demo, ZeRO-{engine.get('zero_stage', '?')} {engine.get('precision', '?')}"
    notes = (f"{result.get('steps', 0)} steps, loss {result.get('loss_first', float('nan')):.3f} → "
             f"{result.get('loss_last', float('nan')):.3f}; optimizer {engine.get('optimizer', '?')} "
             f"({engine.get('optimizer_impl', '?')}); checkpoint {', '.join(result.get('checkpoints', [])) or 'none'}")
    if "cuda_peak_gb" in result:
        notes += f"; peak {result['cuda_peak_gb']:.2f} GB"
    failed = [a["status"] for a in result.get("attempts", [])[:-1]]
    if failed:
        notes += "; earlier attempt: " + " / ".join(failed)
    tflops = result.get("tflops")
    return _row("main_job", label, ms=result.get("step_ms"), tokens_per_s=result.get("tokens_per_s"),
                flops_per_s=tflops * 1e12 if tflops is not None else None, mfu=result.get("mfu"), notes=notes)


def rows(payload: dict) -> list[dict]:
    """One row per measured thing (a part that did not run: one row with its status)."""
    parts, peak, out = payload["parts"], payload["peak_flops"], []
    for part, result in parts.items():
        made: list[dict] = []
        if part == "moe":
            made = _moe_rows(result, peak)
        elif part in ("train", "train_compiled"):
            made = _train_rows(part, result)
        elif part == "main_job" and result["status"] == "ok":
            made = [_main_job_row(result)]
        if result["status"] != "ok" or not made:
            made.append(_row(part, "(part)", notes=result["status"]))
        out += made
    return out


# ---------------------------------------------------------------- the command

def main(args: Any) -> int:
    """`ava-bench gpu [--dry-run] [--parts a,b] [--out FILE.json]`."""
    import torch

    from ava.bench import table as tbl

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"ava-bench gpu: unknown part(s) {unknown}; expected a subset of {list(PARTS)}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.dry_run:
        print("ava-bench gpu: no CUDA device here; `ava-bench gpu --dry-run` rehearses it on the CPU", file=sys.stderr)
        return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix="ava-bench-gpu-")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    s = Settings(device=device, dtype=args.dtype, dry_run=args.dry_run, seed=args.seed, threads=args.threads,
                 workdir=str(Path(workdir).resolve()))
    print(f"ava-bench gpu: {', '.join(parts)} on {device} ({dtype_note(s)}); logs in {s.workdir}", flush=True)
    payload = run(s, parts)
    tbl.write_json(args.out, payload)
    tbl.print_last(tbl.gpu_table(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
