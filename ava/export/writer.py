"""Write an exported model directory atomically: sharded safetensors, an index with checksums.

Everything goes to a hidden temporary sibling first and is renamed into place at the end, so a
crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from ava.files import apply_default_modes, sha256_file
from ava.hf.shards import INDEX_NAME, plan_shards, shard_names


def write_export_dir(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    json_files: dict[str, dict[str, Any]],
    text_files: dict[str, str],
    copy_files: dict[str, Path],
    max_shard_bytes: int,
    metadata: dict[str, str],
    progress: Callable[[str], None] = lambda _msg: None,
    replace: bool = False,
) -> Path:
    """Write the directory. An existing non-empty one is refused unless `replace`: then the old
    export is swapped out only after the new one is complete (a crash keeps the old one)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not replace:
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another OUT_DIR, remove it, "
                              "or pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        groups = plan_shards(tensors, max_shard_bytes)
        names = shard_names(len(groups))
        weight_map, checksums, total = {}, {}, 0
        for file_name, group in zip(names, groups, strict=False):
            progress(f"writing {file_name} ({len(group)} tensors)")
            part = {n: tensors[n].contiguous() for n in group}
            save_file(part, tmp / file_name, metadata={"format": "pt"})
            checksums[file_name] = sha256_file(tmp / file_name)
            total += sum(t.numel() * t.element_size() for t in part.values())
            weight_map.update(dict.fromkeys(group, file_name))
        index = {"metadata": {"total_size": total, "sha256": checksums, **metadata}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        for name, payload in json_files.items():
            (tmp / name).write_text(json.dumps(payload, indent=2))
        for name, text in text_files.items():
            (tmp / name).write_text(text)
        for name, src in copy_files.items():
            shutil.copyfile(src, tmp / name)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        apply_default_modes(tmp)  # mkdtemp made it private (0700); the export is meant to be shared
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
