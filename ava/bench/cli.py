"""`ava-bench moe|train|ep|gpu [--quick|--full|--dry-run] [--out FILE.json] [--threads N]`: tables printed last."""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from typing import Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the memory profiler's start/stop lines

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ava-bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", help="write results as JSON to this file")
    common.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (CPU; default: all cores); recorded in the output")
    common.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    common.add_argument("--warmup", type=int, default=None)
    common.add_argument("--repeats", type=int, default=None)
    common.add_argument("--seed", type=int, default=0)

    moe = sub.add_parser("moe", parents=[common], help="one MoE layer, forward+backward, Ava vs peers")
    size = moe.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny sweep (seconds; smoke tests)")
    size.add_argument("--full", action="store_true", help="the whole grid (hours on a CPU)")
    moe.add_argument("--impls", default=None, help="comma-separated subset of implementations")

    train = sub.add_parser("train", parents=[common], help="full training step, Ava vs MixtralForCausalLM")
    train.add_argument("--preset", default="tiny_mixtral")
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--quick", action="store_true", help="a tiny model and 2 steps (smoke tests)")
    train.add_argument("--reduced", action="store_true",
                       help="the preset's width at 2 layers and vocabulary 4,096 (default: its own dimensions)")
    train.add_argument("--single-thread", action=argparse.BooleanOptionalAction, default=True,
                       help="on a CPU, time one thread as well as all of them (default: on)")
    train.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    train.add_argument("--compile", action="store_true",
                       help="also Ava and the grouped-experts peer with each block torch.compiled (trainer.compile)")
    train.add_argument("override", nargs="*", help="model overrides key=value (e.g. num_layers=4)")

    ep = sub.add_parser("ep", parents=[common], help="training throughput at expert-parallel size 1 vs 2 (torchrun)")
    ep.add_argument("--preset", default="tiny_mixtral")
    ep.add_argument("--ranks", type=int, default=2)
    ep.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ep.add_argument("--seq-len", type=int, default=256)
    ep.add_argument("--quick", action="store_true", help="the nano model and 2 steps (smoke tests)")
    ep.add_argument("override", nargs="*", help="model overrides key=value (e.g. num_layers=4)")

    from ava.bench.gpu_bench import PARTS

    gpu = sub.add_parser("gpu", help="one GPU, one call under 8 minutes: the MoE sweep, the base preset's step "
                                     "with MFU (compile off and on) and the main job under ZeRO-2, in bf16")
    gpu.add_argument("--dry-run", action="store_true",
                     help="the same parts at tiny sizes (on the CPU when there is no GPU): a rehearsal in seconds")
    gpu.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    gpu.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    gpu.add_argument("--workdir", default=None,
                     help="the parts' logs, the main job's run directory and data cache (default: a new temp dir)")
    gpu.add_argument("--out", help="write results as JSON to this file")
    gpu.add_argument("--device", default=None, help="cuda (default when available) or cpu (--dry-run only)")
    gpu.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every part")
    gpu.add_argument("--seed", type=int, default=0)
    return p


def quiet() -> None:
    """Peers log at import and init (DeepSpeed, transformers); the table is what matters."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="deepspeed")
    warnings.filterwarnings("ignore", message=".*profiler.*")


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    quiet()
    if args.command == "gpu":
        from ava.bench import gpu_bench

        return gpu_bench.main(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from ava.bench import table as tbl

    started = time.time()
    if args.command == "moe":
        from ava.bench import moe_bench

        if args.quick:
            points, warmup, repeats = moe_bench.quick_sweep(), 1, 2
        elif args.full:
            points, warmup, repeats = moe_bench.full_sweep(), 2, 5
        else:
            points, warmup, repeats = moe_bench.default_sweep(), 2, 5
        warmup = args.warmup if args.warmup is not None else warmup
        repeats = args.repeats if args.repeats is not None else repeats
        impls = tuple(args.impls.split(",")) if args.impls else moe_bench.IMPLS
        if "ava" not in impls:
            impls = ("ava", *impls)
        rows = []
        for i, pt in enumerate(points, 1):
            print(f"[{i}/{len(points)}] {pt.label}", flush=True)
            rows.append(moe_bench.run_point(pt, warmup=warmup, repeats=repeats, device=device, impls=impls,
                                            seed=args.seed))
        payload = {
            "benchmark": "moe", "environment": tbl.environment(device, threads), "dtype": "fp32",
            "warmup": warmup, "repeats": repeats, "memory_method": moe_bench.MEMORY_METHOD,
            "flops_definition": "18 * tokens * top_k * hidden * ffn (expert matmuls, forward + backward)",
            "points": rows, "targets": moe_bench.targets(rows), "seconds": time.time() - started,
        }
        tbl.write_json(args.out, payload)
        tbl.print_last(tbl.moe_table(payload))
        return 0

    if args.command == "ep":
        from ava.bench import ep_bench, train_bench

        overrides = train_bench.parse_overrides(args.override)
        preset, batch, seq_len = args.preset, args.batch, args.seq_len
        warmup = args.warmup if args.warmup is not None else 1
        steps = args.repeats if args.repeats is not None else (2 if args.quick else 6)
        if args.quick:
            preset, batch, seq_len = "nano", 2, 32
        elif device.type == "cpu":  # the CPU-sized model, with the user's overrides on top
            overrides = {**train_bench.REDUCED, **overrides}
        per_rank = max(1, (os.cpu_count() or args.ranks) // args.ranks)
        payload = ep_bench.run_ep(preset, ranks=args.ranks, batch=batch, seq_len=seq_len, warmup=warmup,
                                  steps=steps, overrides=overrides, threads_per_rank=args.threads or per_rank)
        payload = {"benchmark": "ep", "environment": tbl.environment(device, args.threads or per_rank), **payload,
                   "seconds": time.time() - started}
        tbl.write_json(args.out, payload)
        tbl.print_last(tbl.ep_table(payload))
        return 0

    from ava.bench import train_bench

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    overrides = train_bench.parse_overrides(args.override)
    batch, seq_len = args.batch, args.seq_len
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.repeats if args.repeats is not None else (2 if args.quick else 6)
    if args.quick:
        overrides = {**train_bench.QUICK, **overrides}
        batch, seq_len = 2, 32
    thread_counts = [threads, 1] if device.type == "cpu" and args.single_thread else [threads]
    payload = train_bench.run_train(args.preset, batch=batch, seq_len=seq_len, steps=steps, warmup=warmup,
                                    device=device, dtype=dtype, overrides=overrides, seed=args.seed,
                                    reduced=args.reduced, thread_counts=thread_counts, compile=args.compile)
    payload = {"benchmark": "train", "environment": tbl.environment(device, threads), **payload,
               "seconds": time.time() - started}
    tbl.write_json(args.out, payload)
    tbl.print_last(tbl.train_table(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
