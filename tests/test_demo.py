"""The demo world's teachers (dcdb.demo.teacher) and the whole `dcdb demo` loop (dcdb.demo.run), miniature.

All three use the session's ``demo`` fixture (tests/conftest.py): one run of the loop, whose world
and teachers the teacher tests read, and which the end-to-end test runs a second time.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_teacher_scores_separate_matched_from_mismatched(demo):
    from dcdb.demo.teacher import scores_by_defect

    taught_world = demo.world
    table = scores_by_defect(taught_world)
    for space in ("b32", "l14"):
        assert table["none"][space] > table["mismatched"][space] + 0.02, table
    manifest = json.loads((taught_world / "world.json").read_text())
    emb = manifest["embeddings"]
    assert emb["b32"]["architecture"] == "dcdb-teacher-b32" and emb["l14"]["architecture"] == "dcdb-teacher-l14"
    assert emb["l14"]["checkpoint"] == "teacher/l14/checkpoints/epoch_latest.pt"
    assert (taught_world / emb["b32"]["checkpoint"]).is_file()
    npz = np.load(taught_world / "metadata" / "00000000.npz")
    assert npz["b32_img"].shape[1] == 512 and npz["l14_txt"].shape[1] == 768


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_teacher_steps_are_reused(demo, tmp_path):
    from dcdb.demo.teacher import encode_pool, train_teachers

    taught_world = tmp_path / "world"  # a copy: a failing run would retrain or re-encode it
    shutil.copytree(demo.world, taught_world)
    before = (taught_world / "metadata" / "00000000.npz").stat().st_mtime_ns
    res = train_teachers(taught_world, samples_seen=demo.kwargs["teacher_samples_seen"], workers=0)
    assert all(not r.losses for r in res.values())  # already trained
    encode_pool(taught_world)
    assert (taught_world / "metadata" / "00000000.npz").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_run_demo_end_to_end(demo):
    from dcdb.demo.run import run_demo

    folder, out = demo.folder, demo.out  # the first run, in the session's fixture
    board = (folder / "leaderboard.md").read_text()
    assert "no_filter" in board and "clip_score_l14_30" in board and "average" in board
    assert (folder / "leaderboard.png").stat().st_size > 0
    assert "no_filter-s0" in out
    kept = np.load(folder / "subsets" / "clip_score_l14_30.npy").shape[0]
    assert 0.25 * 1200 < kept < 0.35 * 1200
    assert any(line.startswith("checkpoint") for line in demo.log)  # it trained
    # a second run in the same folder reuses everything: no training, no new world
    lines: list[str] = []
    run_demo(folder, **demo.kwargs, log=lines.append)
    assert lines and not any(line.startswith("checkpoint") for line in lines)
