"""The demo's DataComp effect and wall time: run `dcdb demo` with several training seeds.

    python benchmarks/bench_demo.py --folder /tmp/dcdb-demo-bench --seeds 3

Prints the demo's per-filter table (mean average over seeds, spread max-min, stdev), its wall time,
and whether CLIP-score filtering (l14, top 30%) beats no filtering by more than the spread across
seeds. Reuses a previous run's folder (world, teachers, subsets, finished runs).
"""

from __future__ import annotations

import argparse
import json
import time

from dcdb.demo.run import (
    DEMO_CONCEPTS,
    DEMO_SAMPLES,
    STUDENT_SAMPLES_SEEN,
    TEACHER_SAMPLES_SEEN,
    demo_effect,
    run_demo,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/dcdb-demo-bench")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=DEMO_SAMPLES)
    ap.add_argument("--concepts", type=int, default=DEMO_CONCEPTS)
    ap.add_argument("--samples-seen", type=int, default=STUDENT_SAMPLES_SEEN)
    ap.add_argument("--teacher-samples-seen", type=int, default=TEACHER_SAMPLES_SEEN)
    ap.add_argument("--filters", nargs="*", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = run_demo(args.folder, samples=args.samples, concepts=args.concepts, seeds=args.seeds,
                   samples_seen=args.samples_seen, teacher_samples_seen=args.teacher_samples_seen,
                   filters=args.filters, progress=False)
    print(out)
    print(f"wall time {time.perf_counter() - t0:.0f}s")
    print(json.dumps(demo_effect(args.folder), indent=1))


if __name__ == "__main__":
    main()
