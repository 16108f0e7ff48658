"""`rtdp control` timing (issue 6): the push-v3 checkpoint of the closed-loop benchmark drives the simulator at
50 Hz for at least 10,000 ticks, (a) with DDIM-10 and 8 actions per decision, with inference in its own process
(the default) and (a') on a thread of the loop's process, (b) with RTI (k0 = 3) deciding every tick, and (c) with
30 ms added to every DDIM-10 decision (more than three 20 ms periods in all), where the loop must keep every tick
by executing chunk actions.

    python benchmarks/control.py [--ticks 10000] [--runs ddim ddim-thread rti slow]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policy.rti import PAPER_TAIL  # noqa: E402  (the repository root is on the path from here)

CHECKPOINT = ROOT / "benchmarks" / "results" / "closed_loop" / "runs" / "push-v3"
RUNS = {
    "ddim": dict(sampler="ddim", steps=10),
    "ddim-thread": dict(sampler="ddim", steps=10, worker="thread"),
    "rti": dict(rti=PAPER_TAIL),
    "slow": dict(sampler="ddim", steps=10, inference_delay_ms=30.0),
}


def main() -> None:
    from evaluation.control import ControlSettings, control_summary, run_control

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "control")
    ap.add_argument("--ticks", type=int, default=10_000)
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        report = run_control(ControlSettings(checkpoint=str(CHECKPOINT), rate_hz=50.0, episodes=1,
                                             min_ticks=args.ticks, **RUNS[name]))
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
        print(control_summary(report), flush=True)


if __name__ == "__main__":
    main()
