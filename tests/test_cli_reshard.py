"""The resharder wired into the CLI: ingest --shards, the shard_index view, query --reshard."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dcdb.cli import cli


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # webdataset 1.0.2 leaves tar files open
def test_ingest_shards_then_query_reshard(tmp_path):
    import webdataset as wds

    from dcdb.demo.world import build_world

    # the pool and its shards only: no teacher split, the smallest eval tasks
    build_world(tmp_path / "world", samples=240, concepts=6, teacher_samples=0, eval_per_class=1,
                retrieval_samples=1, workers=1)
    r = CliRunner()
    pool, out = tmp_path / "pool", tmp_path / "out"
    res = r.invoke(cli, ["-q", "ingest", str(tmp_path / "world" / "metadata"), str(pool), "-j", "1",
                         "--shards", str(tmp_path / "world" / "shards")])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["sql", "SELECT count(*) FILTER (WHERE downloaded) AS n FROM shard_index",
                         "--pool", str(pool), "--format", "csv"])
    assert res.exit_code == 0, res.output
    downloaded = int(res.stdout.split()[-1])
    assert 0 < downloaded < 240
    res = r.invoke(cli, ["-q", "query", "no_filter", "--pool", str(pool), "-o", str(tmp_path / "all.npy"),
                         "--reshard", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["output_count"] == downloaded
    assert len(np.load(out / "missing_uids.npy")) == 240 - downloaded
    assert np.load(out / "sample_ids.npy").tobytes() == np.load(tmp_path / "all.npy").tobytes()
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)]
    assert len(keys) == downloaded and all(k.endswith("-0") for k in keys)
    # an existing OUT from another run is refused before anything is written
    res = r.invoke(cli, ["query", "-", "--pool", str(pool), "--reshard", str(out)],
                   input="SELECT uid FROM pool LIMIT 5")
    assert res.exit_code != 0 and "error:" in res.stderr
