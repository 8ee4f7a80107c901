"""The on-disk layout of training checkpoints, shared by the trainer (writes) and the exporter (reads).

    <run_dir>/checkpoints/
        step_00000500/     one tag per save: DeepSpeed's files from every rank, Ava's per-rank state
            COMPLETE.json  the manifest: every file's size and sha256, written last (after a
                           barrier that every rank reached with its files on disk), atomically
        latest             the newest complete tag (for DeepSpeed's own tools)

A tag without a manifest was interrupted mid-save; a tag whose files differ from its manifest
(truncated, flipped bytes, missing) is corrupt. Neither is ever resumed, rolled back to or
exported. The manifest guards integrity (accidents), not authenticity: anyone who can write the
directory can rewrite the manifest too, and DeepSpeed's own files are pickles.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from ava.files import sha256_file

log = logging.getLogger("ava.checkpoints")

MARKER = "COMPLETE.json"
RUN_CHAT_TEMPLATE = "chat_template.jinja"  # in the run directory when it trained on conversations
LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
MANIFEST_FORMAT = 2  # 1: a bare list of file names (no sizes, no hashes)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    """Has a manifest: the save finished on every rank (its files may still have rotted since)."""
    return (tag_dir / MARKER).is_file()


def payload_files(tag_dir: Path) -> List[str]:
    """The files a manifest covers: everything under the tag but the manifest and temporaries."""
    names = []
    for path in tag_dir.rglob("*"):
        rel = path.relative_to(tag_dir).as_posix()
        if path.is_file() and rel != MARKER and not path.name.startswith("."):
            names.append(rel)
    return sorted(names)


def file_digest(path: Path) -> Dict[str, object]:
    """{"size", "sha256"} of one file."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def digest_files(tag_dir: Path, names: Iterable[str]) -> Dict[str, Dict[str, object]]:
    return {name: file_digest(tag_dir / name) for name in names}


def read_manifest(tag_dir: Path) -> Dict:
    """The parsed manifest; ValueError naming the file when it is not valid JSON of either format."""
    path = tag_dir / MARKER
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), (dict, list)):
        raise ValueError(f"{path}: not a checkpoint manifest (no 'files' entry)")
    return manifest


def verify(tag_dir: Path, *, hashes: bool = True) -> List[str]:
    """What is wrong with one tag (empty when intact): no manifest, a file missing, a size or a
    sha256 (`hashes=False`: sizes only) that differs from the manifest. Each problem names the file."""
    if not is_complete(tag_dir):
        return [f"no {MARKER}: its save was interrupted"]
    try:
        manifest = read_manifest(tag_dir)
    except ValueError as exc:
        return [str(exc)]
    files = manifest["files"]
    problems = []
    if isinstance(files, list):  # format 1: names only
        return [f"{tag_dir / n}: missing" for n in files if not (tag_dir / n).exists()]
    for name, want in sorted(files.items()):
        path = tag_dir / name
        if not isinstance(want, dict):
            problems.append(f"{tag_dir / MARKER}: entry {name!r} is not a size/sha256 record")
            continue
        try:
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != want.get("size"):
                problems.append(f"{path}: {size} bytes, the manifest says {want.get('size')} "
                                "(truncated or overwritten)")
            elif hashes and file_digest(path)["sha256"] != want.get("sha256"):
                problems.append(f"{path}: sha256 differs from the manifest's (the file changed "
                                "after it was saved)")
        except OSError as exc:  # EIO from a bad block, EACCES: damage to report, not a crash
            problems.append(f"{path}: unreadable ({exc.strerror or exc})")
    return problems


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


def newest_intact(ckpt_dir: Path, *, max_step: Optional[int] = None, hashes: bool = True
                  ) -> Tuple[Optional[Path], List[str]]:
    """The newest tag (at or before `max_step`) that is complete and matches its manifest, and the
    reasons every newer tag was passed over (each also logged as a warning)."""
    rejected: List[str] = []
    for step, tag_dir in reversed(list_tags(ckpt_dir)):
        if max_step is not None and step > max_step:
            continue
        problems = verify(tag_dir, hashes=hashes)
        if not problems:
            return tag_dir, rejected
        reason = f"{tag_dir.name}: " + "; ".join(problems)
        rejected.append(reason)
        kind = "incomplete" if not is_complete(tag_dir) else "corrupt"
        log.warning("checkpoint %s (step %d) is %s: %s; skipping it", tag_dir, step, kind,
                    "; ".join(problems))
    return None, rejected
