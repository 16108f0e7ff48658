"""The ROS 2 node over Zenoh on push-v3 at 50 Hz, node and robot as separate processes on a loopback router:
deadline misses, period error, what the bus and the node add to an action beyond inference, success against
in-process `rtdp control` on the same seeds, and the same run under injected faults.

    python benchmarks/node.py --checkpoint /work/node_bench/push [--ticks 10000] [--stage all|clean|faults|control]
        [--inference-nice N] [--inference-cpus C] [--loop-cpus C] [--robot-cpus C] [--out benchmarks/results/node]

Each stage writes its reports to --out and is skipped when they are there; the table and plot are made from
whatever is there. `--inference-nice` runs the node's inference process N nice levels below the loop;
`--inference-cpus` pins it to those CPUs, `--loop-cpus` runs the router and the node under `taskset` on others,
`--robot-cpus` the robot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "node"
FAULTS = "drop=0.1,reorder=0.05,garbage=0.01"


PINNED = {"loop": [], "robot": []}  # `taskset -c CPUS` prefixes: the router and the node; the robot


def rtdp(*args: str, on: str = "loop") -> list[str]:
    return [*PINNED[on], sys.executable, "-m", "rtdp", *args]


def run_pair(checkpoint: str, label: str, ticks: int, robot_extra: list[str], nice: int = 0,
             inference_cpus: str | None = None) -> None:
    """Router, node and robot-sim as three processes; the robot finalizes the node when it has run `ticks`."""
    from deploy.zenoh_graph import free_endpoint

    node_report, robot_report = OUT / f"node_{label}.json", OUT / f"robot_{label}.json"
    if node_report.exists() and robot_report.exists():
        return
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
    endpoint = free_endpoint()
    router = subprocess.Popen(rtdp("router", "--listen", endpoint), cwd=ROOT, env=env)
    time.sleep(1.0)
    node = subprocess.Popen(rtdp("node", "--checkpoint", checkpoint, "--router", endpoint, "--rate", "50",
                                 "--inference-nice", str(nice), "--report", str(node_report),
                                 *(["--inference-cpus", inference_cpus] if inference_cpus else [])), cwd=ROOT, env=env)
    try:
        subprocess.run(rtdp("robot-sim", "--checkpoint", checkpoint, "--router", endpoint, "--min-ticks", str(ticks),
                            "--episodes", "1", "--shutdown-node", "--report", str(robot_report), *robot_extra,
                            on="robot"),
                       cwd=ROOT, env=env, check=True)
        node.wait(timeout=60)
    finally:
        for p in (node, router):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


def run_control(checkpoint: str, episodes: int, nice: int = 0) -> None:
    report = OUT / "control_in_process.json"
    if not report.exists():
        env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
        subprocess.run(rtdp("control", "--checkpoint", checkpoint, "--rate", "50", "--episodes", str(episodes),
                            "--inference-nice", str(nice), "--report", str(report)), cwd=ROOT, env=env, check=True)


ECHO_LISTENER = """
import sys, time, json
import numpy as np
from deploy.zenoh_graph import Attachment, RosNode, ZenohSettings, open_session
session = open_session(ZenohSettings(router=sys.argv[1]))
ros, lat = RosNode(session, "listener"), []
ros.subscription("/rtdp/echo", "std_msgs/msg/Float32MultiArray",
                 lambda s: lat.append((s.received_ns - Attachment.decode(s.attachment).source_timestamp) / 1e6))
time.sleep(float(sys.argv[2]))
print(json.dumps(lat), flush=True)
ros.close()
session.close()
"""


def run_transport(samples: int = 3000) -> None:
    """The bus alone, nothing else running: one observation-sized message every 20 ms from one process to another
    through the router. The floor under the node's transport figures."""
    report = OUT / "transport_floor.json"
    if report.exists():
        return
    import numpy as np

    from deploy.ros_messages import encode, observation_message
    from deploy.timing import percentiles
    from deploy.zenoh_graph import RosNode, ZenohSettings, free_endpoint, open_session

    endpoint = free_endpoint()
    router = subprocess.Popen(rtdp("router", "--listen", endpoint), cwd=ROOT)
    time.sleep(1.0)
    seconds = samples * 0.02 + 3.0
    listener = subprocess.Popen([sys.executable, "-c", ECHO_LISTENER, endpoint, str(seconds)], cwd=ROOT,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    session = open_session(ZenohSettings(router=endpoint))
    publisher = RosNode(session, "talker").publisher("/rtdp/echo", "std_msgs/msg/Float32MultiArray")
    time.sleep(1.5)
    payload = encode(observation_message(np.zeros(39), "std_msgs/msg/Float32MultiArray", 0))
    for _ in range(samples):
        publisher.put(payload)
        time.sleep(0.02)
    latencies = json.loads(listener.stdout.readline())
    listener.wait(timeout=30)
    session.close()
    router.terminate()
    router.wait(timeout=10)
    report.write_text(json.dumps({"samples": len(latencies), "one_way_ms": percentiles(latencies, ("p50", "p99")),
                                  "date": time.strftime("%Y-%m-%d")}, indent=2))


def load(name: str) -> dict | None:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else None


def table() -> str:
    rows = ["| figure | goal | node (clean) | node (faults) | in-process `rtdp control` |", "|---|---|---|---|---|"]
    nc, rc, nf, rf, ctl = (load(n) for n in ("node_clean.json", "robot_clean.json", "node_faults.json",
                                             "robot_faults.json", "control_in_process.json"))

    def cell(n, r, what):
        if n is None or r is None:
            return "-"
        return what(n, r)

    def beyond(n, r):
        a, b = n["observation_in_to_action_out_ms"], r["action_transport_ms"]
        return f"{a['p50'] + b['p50']:.2f} / {a['p99'] + b['p99']:.2f}"

    def success(n, r):
        lo, hi = r["success_ci95"]
        return f"{r['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] ({r['episodes']} ep.)"

    def faults(n, r):
        keys = ("observations_dropped", "observations_out_of_order", "observations_garbage")
        return (f"injected drop {r['faults_injected']['drop']}, reorder {r['faults_injected']['reorder']}, garbage "
                f"{r['faults_injected']['garbage']}, kill {r['inference_kills']}; counted "
                + ", ".join(f"{k.split('_', 1)[1]} {n[k]}" for k in keys) + f", restarts {n['inference_restarts']}")

    specs = [
        ("ticks", "≥ 10,000", lambda n, r: f"{n['ticks']}"),
        ("deadline misses", "0", lambda n, r: f"{n['deadline_misses']}"),
        ("period error p99 (ms)", "≤ 1", lambda n, r: f"{n['period_error_ms']['p99']:.3f}"),
        ("obs in → action out beyond inference, p50 / p99 (ms)", "≤ 0.5 / 2", beyond),
        ("success", "within control's interval", success),
        ("faults", "0 crashes, all counted", faults),
    ]
    for label, goal, what in specs:
        ctl_cell = "-"
        if ctl is not None:
            ctl_cell = {"ticks": f"{ctl['ticks']}", "deadline misses": f"{ctl['deadline_misses']}",
                        "period error p99 (ms)": f"{ctl['period_error_ms']['p99']:.3f}",
                        "success": f"{ctl['success_rate']:.2f} [{ctl['success_ci95'][0]:.2f}, "
                                   f"{ctl['success_ci95'][1]:.2f}] ({ctl['episodes']} ep.)"}.get(label, "-")
        rows.append(f"| {label} | {goal} | {cell(nc, rc, what)} | {cell(nf, rf, what)} | {ctl_cell} |")
    return "\n".join(rows)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, load(f"node_{label}.json"), load(f"robot_{label}.json")) for label in ("clean", "faults")]
    runs = [(label, n, r) for label, n, r in runs if n and r]
    if not runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    parts = [("obs transport", lambda n, r: n["observation_transport_ms"]), ("node tick", lambda n, r: n["tick_ms"]),
             ("action transport", lambda n, r: r["action_transport_ms"]),
             ("period error", lambda n, r: n["period_error_ms"])]
    width = 0.8 / len(runs)
    for i, (label, n, r) in enumerate(runs):
        for j, q in enumerate(("p50", "p99")):
            axes[j].bar([k + i * width for k in range(len(parts))], [get(n, r)[q] for _, get in parts], width,
                        label=label)
    for j, q in enumerate(("p50", "p99")):
        axes[j].set_xticks([k + width * (len(runs) - 1) / 2 for k in range(len(parts))], [p for p, _ in parts],
                           fontsize=8)
        axes[j].set_ylabel(f"{q} (ms)")
        axes[j].legend(fontsize=8)
    fig.suptitle("rtdp node + robot-sim over Zenoh, push-v3 @ 50 Hz")
    fig.tight_layout()
    fig.savefig(OUT / "latency.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/work/node_bench/push")
    ap.add_argument("--ticks", type=int, default=10_000)
    ap.add_argument("--stage", default="all", choices=["all", "clean", "faults", "control", "transport", "table"])
    ap.add_argument("--inference-nice", type=int, default=0, help="the inference process's nice increment")
    ap.add_argument("--inference-cpus", help="pin the node's inference process to these CPUs, e.g. 1")
    ap.add_argument("--loop-cpus", help="run the router and the node on these CPUs, e.g. 0")
    ap.add_argument("--robot-cpus", help="run robot-sim on these CPUs")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/node")
    args = ap.parse_args()
    global OUT
    for on, cpus in (("loop", args.loop_cpus), ("robot", args.robot_cpus)):
        PINNED[on] = ["taskset", "-c", cpus] if cpus else []
    OUT = args.out.resolve() if args.out else OUT
    OUT.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "clean"):
        run_pair(args.checkpoint, "clean", args.ticks, [], args.inference_nice, args.inference_cpus)
    if args.stage in ("all", "faults"):
        run_pair(args.checkpoint, "faults", args.ticks, ["--faults", FAULTS, "--kill-inference-after",
                                                          str(args.ticks // 2)], args.inference_nice,
                 args.inference_cpus)
    if args.stage in ("all", "control"):
        clean = load("robot_clean.json")
        run_control(args.checkpoint, clean["episodes"] if clean else 30, args.inference_nice)
    if args.stage in ("all", "transport"):
        run_transport()
    text = table()
    print(text)
    plot()
    (OUT / "summary.json").write_text(json.dumps({"machine": f"{platform.node()} ({os.cpu_count()} cores, CPU only)",
                                                  "date": time.strftime("%Y-%m-%d"), "checkpoint": args.checkpoint,
                                                  "inference_nice": args.inference_nice,
                                                  "inference_cpus": args.inference_cpus, "loop_cpus": args.loop_cpus,
                                                  "robot_cpus": args.robot_cpus,
                                                  "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
