"""pretrain/checkpoint/resume.py and verify.py without ranks: which tag --resume picks, and the manifest check
(sizes and sha256) that decides it."""

from __future__ import annotations

import os

import pytest

from pretrain.checkpoint.resume import find_resume
from pretrain.checkpoint.tags import MANIFEST, RunFolderError
from pretrain.checkpoint.verify import verify_tag
from tests.helpers.tags import make_tag


def test_resume_auto_picks_the_newest_complete_tag(tmp_path):
    for s, done in ((3, True), (6, True), (9, False)):  # step 9: killed while saving
        make_tag(tmp_path, s, complete=done)
    p = find_resume(tmp_path, "auto")
    assert p.tag.name == "step_00000006" and p.state == {"step": 6} and not p.skipped
    assert p.layout == {"world_size": 1, "zero_stage": 3, "ep_backend": "none", "ep_size": 1}


def test_find_resume_skips_damaged_tags_and_names_the_file(tmp_path):
    make_tag(tmp_path, 3)
    make_tag(tmp_path, 6)
    make_tag(tmp_path, 9, complete=False)  # an interrupted save
    t6 = tmp_path / "step_00000006"
    assert find_resume(tmp_path, "auto").tag == t6 and verify_tag(t6) is None
    (t6 / "a.pt").write_bytes(b"y" * 10)  # same size, other bytes
    p = find_resume(tmp_path, "auto")
    assert p.tag.name == "step_00000003" and "a.pt" in p.skipped[0] and "sha256" in p.skipped[0]
    (t6 / "a.pt").write_bytes(b"y")
    assert "truncated" in verify_tag(t6)
    (t6 / "a.pt").unlink()
    assert "missing" in verify_tag(t6)
    with pytest.raises(RunFolderError, match="a.pt"):
        find_resume(tmp_path, "step_00000006")  # a named tag is never replaced
    assert find_resume(tmp_path, str(tmp_path / "step_00000003")).tag == tmp_path / "step_00000003"
    with pytest.raises(RunFolderError, match="no checkpoint folder"):
        find_resume(tmp_path, "step_00000042")
    (tmp_path / "step_00000003" / MANIFEST).write_text("{not json")
    with pytest.raises(RunFolderError, match="no usable checkpoint"):
        find_resume(tmp_path, "auto")
    assert find_resume(tmp_path / "empty", "auto") is None and find_resume(tmp_path, "none") is None


def test_verify_hashes_are_checked_not_only_sizes(tmp_path):
    t = make_tag(tmp_path, 3, files={"big.pt": os.urandom(1 << 20), "sub/x.json": b"{}"})
    assert verify_tag(t) is None and verify_tag(t, quick=True) is None
    data = bytearray((t / "big.pt").read_bytes())
    data[12345] ^= 1
    (t / "big.pt").write_bytes(bytes(data))
    assert "big.pt" in verify_tag(t) and verify_tag(t, quick=True) is None  # quick: sizes only


def test_a_tag_written_with_a_manifest_that_lost_it_is_damaged(tmp_path):
    make_tag(tmp_path, 3)
    t6 = make_tag(tmp_path, 6)
    (t6 / MANIFEST).unlink()  # run_state.json is there: the tag was written with a manifest
    bad = verify_tag(t6)
    assert bad and MANIFEST in bad and "run_state.json" in bad
    p = find_resume(tmp_path, "auto")
    assert p.tag.name == "step_00000003" and MANIFEST in p.skipped[0]
    with pytest.raises(RunFolderError, match=MANIFEST):
        find_resume(tmp_path, "step_00000006")
