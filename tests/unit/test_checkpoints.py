"""Checkpoint manifests: what `verify` reports for each kind of damage, and which tag
`newest_intact` picks (the multi-rank save and resume paths are in tests/integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ava.checkpoints import (
    MANIFEST_FORMAT,
    MARKER,
    digest_files,
    newest_intact,
    payload_files,
    tag_for,
    verify,
)


def make_tag(root: Path, step: int, files: dict) -> Path:
    """A tag written the way the trainer writes one: files first, then the manifest."""
    tag = root / tag_for(step)
    tag.mkdir(parents=True)
    for name, data in files.items():
        (tag / name).parent.mkdir(parents=True, exist_ok=True)
        (tag / name).write_bytes(data)
    manifest = {"format": MANIFEST_FORMAT, "step": step,
                "files": digest_files(tag, payload_files(tag))}
    (tag / MARKER).write_text(json.dumps(manifest))
    return tag


FILES = {"mp_rank_00_model_states.pt": b"m" * 1000, "ava_rank_00000.pt": b"r" * 10,
         "sub/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o" * 500}


def test_intact_tag_has_no_problems_and_manifest_lists_every_file(tmp_path):
    tag = make_tag(tmp_path, 4, FILES)
    (tag / ".tmp_leftover").write_bytes(b"x")  # hidden temporaries are not payload
    assert verify(tag) == []
    manifest = json.loads((tag / MARKER).read_text())
    assert sorted(manifest["files"]) == sorted(FILES)
    assert manifest["files"]["ava_rank_00000.pt"]["size"] == 10


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "mp_rank_00_model_states.pt: 990 bytes, the manifest says 1000 (truncated or overwritten)"),
    ("flip", "mp_rank_00_model_states.pt: sha256 differs from the manifest's (the file changed after it was saved)"),
    ("delete", "mp_rank_00_model_states.pt: missing"),
])
def test_each_kind_of_damage_is_named_with_the_file(tmp_path, damage, expected):
    tag = make_tag(tmp_path, 4, FILES)
    path = tag / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "flip":
        path.write_bytes(b"M" + path.read_bytes()[1:])
    else:
        path.unlink()
    assert verify(tag) == [f"{tag}/{expected}"]


def test_size_only_mode_misses_a_same_size_change_but_not_truncation(tmp_path):
    tag = make_tag(tmp_path, 4, FILES)
    path = tag / "ava_rank_00000.pt"
    path.write_bytes(b"R" * 10)
    assert verify(tag, hashes=False) == []
    assert len(verify(tag)) == 1
    path.write_bytes(b"R" * 9)
    assert "9 bytes" in verify(tag, hashes=False)[0]


def test_newest_intact_skips_incomplete_and_corrupt_tags_with_reasons(tmp_path):
    make_tag(tmp_path, 4, FILES)
    corrupt = make_tag(tmp_path, 8, FILES)
    (corrupt / "ava_rank_00000.pt").write_bytes(b"")
    incomplete = tmp_path / tag_for(12)
    incomplete.mkdir()
    (incomplete / "mp_rank_00_model_states.pt").write_bytes(b"half")
    found, rejected = newest_intact(tmp_path)
    assert found == tmp_path / tag_for(4)
    assert rejected == [f"{tag_for(12)}: no {MARKER}: its save was interrupted",
                        f"{tag_for(8)}: {corrupt}/ava_rank_00000.pt: 0 bytes, the manifest says 10 "
                        "(truncated or overwritten)"]
    assert newest_intact(tmp_path, max_step=3) == (None, [])


def test_unreadable_and_legacy_manifests(tmp_path):
    tag = make_tag(tmp_path, 4, FILES)
    (tag / MARKER).write_text("{not json")
    assert verify(tag)[0].startswith(f"{tag / MARKER}: unreadable manifest")
    (tag / MARKER).write_text(json.dumps({"files": sorted(FILES)}))  # format 1: names only
    assert verify(tag) == []
    (tag / "ava_rank_00000.pt").unlink()
    assert verify(tag) == [f"{tag}/ava_rank_00000.pt: missing"]
