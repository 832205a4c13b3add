"""The demo world's teachers (dcdb.demo.teacher) and the whole `dcdb demo` loop (dcdb.demo.run), miniature."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def taught_world(tmp_path_factory):
    from dcdb.demo.teacher import build_teachers
    from dcdb.demo.world import build_world

    out = tmp_path_factory.mktemp("teacher") / "w"
    build_world(out, concepts=8, samples=1200, shard_size=600, teacher_samples=1000, eval_per_class=4,
                retrieval_samples=40, workers=1)
    build_teachers(out, samples_seen=1280, workers=0)
    return out


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_teacher_scores_separate_matched_from_mismatched(taught_world):
    from dcdb.demo.teacher import scores_by_defect

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


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_teacher_steps_are_reused(taught_world):
    from dcdb.demo.teacher import encode_pool, train_teachers

    before = (taught_world / "metadata" / "00000000.npz").stat().st_mtime_ns
    res = train_teachers(taught_world, samples_seen=1280, workers=0)
    assert all(not r.losses for r in res.values())  # already trained
    encode_pool(taught_world)
    assert (taught_world / "metadata" / "00000000.npz").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_run_demo_end_to_end(tmp_path):
    from dcdb.demo.run import run_demo

    lines: list[str] = []
    kw = {"samples": 1200, "concepts": 8, "samples_seen": 320, "teacher_samples_seen": 320, "workers": 0,
          "filters": ["no_filter", "clip_score_l14_30"], "progress": False, "log": lines.append}
    out = run_demo(tmp_path / "demo", **kw)
    board = (tmp_path / "demo" / "leaderboard.md").read_text()
    assert "no_filter" in board and "clip_score_l14_30" in board and "average" in board
    assert (tmp_path / "demo" / "leaderboard.png").stat().st_size > 0
    assert "no_filter-s0" in out
    kept = np.load(tmp_path / "demo" / "subsets" / "clip_score_l14_30.npy").shape[0]
    assert 0.25 * 1200 < kept < 0.35 * 1200
    # a second run reuses everything: no training, no new world
    lines.clear()
    run_demo(tmp_path / "demo", **kw)
    assert not any(line.startswith("checkpoint") for line in lines)
