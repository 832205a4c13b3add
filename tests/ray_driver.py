"""Driver for tests/test_buckets.py::test_ray_engine_identical_to_local, run by the test inside a
loopback-only network namespace: starts a 2-CPU local Ray cluster once and runs ``dcdb query
--engine ray`` (in-process, through click) for every case of a spec file, then once with a worker
killed mid-run (DCDB_FAULT_INJECT) and once with an unsplittable filter, and ``dcdb reshard
--engine ray``; first, before the cluster starts, once with a RAY_ADDRESS nothing answers at;
writes report.json."""

import json
import os
import sys
from pathlib import Path

import ray
from click.testing import CliRunner

from dcdb.cli import cli


def query(args):
    res = CliRunner().invoke(cli, ["-q", "query", *args, "--engine", "ray"])
    return res.exit_code, res.output + (repr(res.exception) if res.exception and res.exit_code else "")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    report = {"codes": [], "outputs": []}
    # a RAY_ADDRESS nothing answers at fails fast with a UsageError (ray.init would retry for minutes)
    os.environ["RAY_ADDRESS"] = spec["bad_address"]
    args = ["no_filter", "--pool", spec["pool"], "-o", str(out / "bad_address.npy")]
    report["bad_address_code"], report["bad_address_output"] = query(args)
    del os.environ["RAY_ADDRESS"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for i, (name, params) in enumerate(spec["cases"]):
        args = [name, *[x for k, v in params.items() for x in ("-p", k, v)], "--pool", spec["pool"]]
        code, text = query([*args, "-o", str(out / f"ray{i}.npy")])
        report["codes"].append(code)
        report["outputs"].append(text[-2000:])
    name, params = spec["cases"][2]
    os.environ["DCDB_FAULT_INJECT"] = str(out / "fault.txt")
    args = [name, *[x for k, v in params.items() for x in ("-p", k, v)], "--pool", spec["pool"]]
    report["fault_code"], report["fault_output"] = query([*args, "-o", str(out / "fault.npy")])
    del os.environ["DCDB_FAULT_INJECT"]
    (out / "refuse.sql").write_text(spec["refuse"] + "\n")
    report["refuse_code"], report["refuse_output"] = query(
        [str(out / "refuse.sql"), "--pool", spec["pool"], "-o", str(out / "refused.npy")]
    )
    res = CliRunner().invoke(cli, ["-q", "reshard", *spec["reshard"], "--engine", "ray"])
    report["reshard_code"], report["reshard_output"] = res.exit_code, res.output + repr(res.exception)
    (out / "report.json").write_text(json.dumps(report))
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
