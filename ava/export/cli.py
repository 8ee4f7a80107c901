"""`ava-export SOURCE OUT_DIR [--layout auto|ava|mixtral|<family>] [--dtype fp32|bf16|fp16]
[--max-shard-size 2GB]` (families: `ava.hf.families`)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from rich.console import Console

from ava.export.exporter import ExportError, export_checkpoint
from ava.hf.layouts import LAYOUTS


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ava-export", description=__doc__.split("`")[0] or None)
    parser.add_argument("source", help="a run directory (newest complete checkpoint) or one checkpoint tag directory")
    parser.add_argument("out_dir", help="where to write the model directory (must not exist or be empty)")
    parser.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS],
                        help="tensor names and config.json: Ava's own, transformers' Mixtral, or a family "
                             "(olmoe, qwen2_moe, qwen3_moe, llama, qwen2, qwen3); auto: mixtral when compatible")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="cast explicitly (default: keep the fp32 master weights)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT_DIR (swapped only once the new export is complete)")
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    logging.basicConfig(level=logging.WARNING)
    try:
        out = export_checkpoint(args.source, args.out_dir, layout=args.layout, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, replace=args.force,
                                progress=lambda m: console.print(f"[dim]{m}[/]"))
    except (ExportError, ValueError, FileExistsError, FileNotFoundError) as err:
        console.print(f"[bold red]ava-export: error:[/] {err}")
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
