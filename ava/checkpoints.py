"""The on-disk layout of training checkpoints, shared by the trainer (writes) and the exporter (reads).

    <run_dir>/checkpoints/
        step_00000500/     one tag per save: DeepSpeed's files from every rank, Ava's per-rank state
            COMPLETE.json  written by rank 0 after a barrier every rank reached with its shards on disk
        latest             the newest complete tag (for DeepSpeed's own tools)

A tag without `COMPLETE.json` was interrupted mid-save and is never resumed or exported.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List, Optional, Tuple

log = logging.getLogger("ava.checkpoints")

MARKER = "COMPLETE.json"
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def list_tags(ckpt_dir: Path) -> List[Tuple[int, Path]]:
    """Every `step_N` directory (complete or not), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = []
    for child in ckpt_dir.iterdir():
        match = TAG_PATTERN.match(child.name)
        if match and child.is_dir():
            tags.append((int(match.group(1)), child))
    return sorted(tags)


def newest_complete(ckpt_dir: Path) -> Optional[Path]:
    """The newest tag with a completeness marker; newer incomplete ones are reported and skipped."""
    for step, tag_dir in reversed(list_tags(ckpt_dir)):
        if is_complete(tag_dir):
            return tag_dir
        log.warning("checkpoint %s (step %d) is incomplete (no %s): its save was interrupted; skipping it",
                    tag_dir, step, MARKER)
    return None
