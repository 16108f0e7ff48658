"""The fixed-rate loop's bookkeeping, checked with a scripted robot and scripted policies whose actions encode
when they were computed: which chunk action goes out on which tick, what is skipped as stale, when a safe action
is held, and how bad observations, slow and failing policies are counted. Nothing here asserts a speed: the
timing figures live in benchmarks (BENCHMARKS.md)."""

import json
import time

import numpy as np
import pytest

from deploy.loop import ControlLoop, LoopSettings
from rtdp.cli import main

RATE = 100.0
PERIOD = 1.0 / RATE


class TickRobot:
    """Observes its own step count; records every action it is sent."""

    def __init__(self, steps: int, nan_every: int = 0):
        self.steps, self.nan_every, self.t = steps, nan_every, 0
        self.sent: list[np.ndarray] = []

    def observe(self):
        if self.nan_every and self.t % self.nan_every == self.nan_every - 1:
            return {"state": np.array([np.nan, 0.0], dtype=np.float32)}
        return {"state": np.array([self.t, 0.0], dtype=np.float32)}

    def act(self, action):
        self.sent.append(np.array(action))
        self.t += 1
        return self.t >= self.steps


def chunk_policy(length: int, delay_s: float = 0.0, calls: list | None = None):
    """Action i of a chunk made from the observation at step s is [s, i, +1]: its intended tick is s + i."""
    def decide(history, executed):
        s = float(history["state"][-1, 0])
        if calls is not None:
            calls.append((s, executed))
        if delay_s:
            time.sleep(delay_s)
        return np.array([[s, i, 1.0] for i in range(length)], dtype=np.float32)
    return decide


def make_loop(decide, replan_every=1, **kw):
    return ControlLoop(decide, LoopSettings(rate_hz=RATE, max_ticks=200, replan_every=replan_every, **kw),
                       {"state": (2,)}, n_obs_steps=2, action_dim=3, actions_per_decision=replan_every,
                       discrete_dims=[2])


def test_every_chunk_action_goes_out_on_its_own_tick_even_when_inference_takes_several_periods():
    loop = make_loop(chunk_policy(16, delay_s=3.5 * PERIOD), replan_every=4)
    robot = TickRobot(120)
    assert loop.run(robot)
    loop.close()
    stats = loop.stats
    executed = [(tick, a) for tick, a in enumerate(robot.sent) if a[2] == 1.0]
    assert len(executed) == stats.ticks - stats.held_ticks
    for tick, a in executed:
        assert a[0] + a[1] == tick  # latency compensated: the action meant for this tick, never a stale one
    assert stats.held_ticks == 0  # 16-action chunks cover 4-period inferences
    assert stats.stale_skipped >= 3 * (stats.decisions - 1)  # each late chunk skipped the ticks it missed
    assert stats.inference_errors == 0 and stats.decisions > 10


def test_a_safe_action_is_held_when_the_chunk_runs_out_and_the_gripper_is_kept():
    loop = make_loop(chunk_policy(2, delay_s=5 * PERIOD), replan_every=1)
    robot = TickRobot(60)
    loop.run(robot)
    loop.close()
    held = [a for a in robot.sent if a[0] == 0 and a[1] == 0 and a[2] == 1.0 and not np.any(a[:2])]
    assert loop.stats.held_ticks > 10
    assert len([a for a in robot.sent if not a[:2].any()]) >= loop.stats.held_ticks - 1
    assert held  # zero motion, gripper command (dim 2) kept from the last action


def test_bad_observations_are_counted_and_held_and_the_loop_carries_on():
    loop = make_loop(chunk_policy(16), replan_every=1)
    robot = TickRobot(100, nan_every=7)
    assert loop.run(robot)
    loop.close()
    nan_ticks = [t for t in range(100) if t % 7 == 6]
    assert loop.stats.bad_observations == len(nan_ticks)
    for t in nan_ticks:
        assert not robot.sent[t][:2].any()  # a safe action on that tick


def test_a_failing_or_hanging_policy_is_reported_while_the_loop_keeps_ticking():
    def failing(history, executed):
        if history["state"][-1, 0] > 20:
            raise ValueError("policy exploded")
        return chunk_policy(16)(history, executed)

    loop = make_loop(failing, replan_every=1)
    robot = TickRobot(80)
    assert loop.run(robot)
    loop.close()
    assert loop.stats.inference_errors > 0 and "policy exploded" in loop.stats.last_error
    assert loop.stats.held_ticks > 0 and loop.stats.ticks == 80

    slow = make_loop(chunk_policy(200, delay_s=0.3), replan_every=1, watchdog_s=0.1)
    slow.run(TickRobot(60))
    slow.close()
    assert slow.stats.watchdog_trips >= 1 and slow.stats.ticks == 60


def test_the_policy_is_told_how_many_ticks_passed_since_its_last_observation():
    calls = []
    loop = make_loop(chunk_policy(16, delay_s=1.5 * PERIOD, calls=calls), replan_every=1)
    loop.run(TickRobot(50))
    loop.close()
    assert calls[0] == (0.0, None)  # the first decision, made before the clock starts
    for (prev, _), (step, executed) in zip(calls[:-1], calls[1:], strict=True):
        assert executed == step - prev


def test_reaction_time_is_the_decision_plus_the_wait_for_the_tick_that_adopts_it():
    # A decision of 1.5 periods requested at tick k finishes between ticks k + 1 and k + 2: its first action goes
    # out on tick k + 2, two periods after the observation was read.
    loop = make_loop(chunk_policy(16, delay_s=1.5 * PERIOD), replan_every=4)
    loop.run(TickRobot(60))
    loop.close()
    reaction = np.array(loop.stats.reaction_ms)
    assert len(reaction) >= 10 and len(reaction) <= loop.stats.decisions
    assert np.all(reaction >= 1.5 * PERIOD * 1e3)
    assert np.median(reaction) == pytest.approx(2 * PERIOD * 1e3, abs=0.25 * PERIOD * 1e3)
    assert np.median(loop.stats.inference_ms) < np.median(reaction)


def test_action_jumps_are_measured_where_a_new_chunk_takes_over_and_elsewhere():
    # chunk_policy's actions are (obs tick, index, 1): within a chunk dim 1 steps by 1 and dim 0 holds; where a
    # chunk made 4 ticks later takes over, dim 0 jumps by 4 (and dim 1 falls back by 3)
    loop = make_loop(chunk_policy(16), replan_every=4)
    loop.run(TickRobot(60))
    loop.close()
    summary = loop.stats.summary()["action_jump"]
    assert summary["within_chunk"] == pytest.approx(1.0)
    assert summary["at_chunk_boundary"] == pytest.approx(4.0)
    assert len(loop.stats.boundary_jumps) >= 10


def test_temporal_ensembling_averages_every_chunk_that_covers_the_tick():
    loop = make_loop(chunk_policy(16, delay_s=0.5 * PERIOD), replan_every=2, chunking="ensemble", ensemble_m=0.5)
    robot = TickRobot(60)
    loop.run(robot)
    loop.close()
    executed = [(tick, a) for tick, a in enumerate(robot.sent) if a[2] == 1.0]
    assert len(executed) >= 50
    for tick, a in executed:
        assert abs(a[0] + a[1] - tick) < 1e-3  # every chunk's vote is meant for this tick
    # with chunks every 2 ticks, up to 8 overlap: the observation tick is a weighted mean, older ones heavier
    blended = [a for _, a in executed[10:] if abs(a[0] - round(a[0])) > 1e-3]
    assert len(blended) >= 0.8 * len(executed[10:])
    tick, a = executed[30]
    assert a[0] < tick - 1  # older chunks, made from earlier observations, weigh more (ACT's m > 0)


def test_an_anytime_decision_with_no_time_is_skipped_and_the_chunk_kept():
    calls = []
    base = chunk_policy(16, calls=calls)

    def sometimes_skipped(history, executed):
        actions = base(history, executed)
        return actions if len(calls) % 2 == 1 else actions[:0]

    loop = make_loop(sometimes_skipped, replan_every=2)
    robot = TickRobot(60)
    loop.run(robot)
    loop.close()
    stats = loop.stats
    assert stats.skipped_decisions >= 5 and stats.held_ticks == 0 and stats.inference_errors == 0
    for tick, a in enumerate(robot.sent):
        assert a[0] + a[1] == tick
    # the tick count the policy is told runs from the chunk in force, not from a skipped decision
    in_force = None
    for k, (step, executed) in enumerate(calls):
        assert executed == (None if in_force is None else step - in_force)
        if k % 2 == 0:  # this call's chunk was kept
            in_force = step


@pytest.mark.parametrize("extra", [[], ["--rti", "2"], ["--worker", "thread"],
                                   ["--backend", "onnxruntime", "--precision", "fp16"],
                                   ["--chunking", "guidance"], ["--chunking", "ensemble", "--worker", "thread"],
                                   ["--chunking", "inpaint", "--rti", "2"], ["--anytime"], ["--anytime", "--rti", "2"]])
def test_control_cli_reports_what_design_md_lists(extra, tmp_path, capsys):
    from deploy.export import ExportSettings, export_policy
    from tests.deploy.test_export import saved_policy

    ckpt = saved_policy(tmp_path / "policy")
    if "--precision" in extra:
        export_policy(ExportSettings(checkpoint=str(ckpt), fused=False, precision="fp16"))
    path = tmp_path / "control.json"
    assert main(["control", "--checkpoint", str(ckpt), "--rate", "50", "--episodes", "1", "--bad-obs-every", "9",
                 "--no-progress", "--report", str(path), *extra]) == 0
    r = json.loads(path.read_text())
    for key in ("rate_hz", "ticks", "deadline_misses", "period_error_ms", "inference_ms", "success_rate"):
        assert key in r
    assert set(r["period_error_ms"]) == {"p50", "p99", "max"} and {"p50", "p99"} <= set(r["inference_ms"])
    assert r["ticks"] == r["per_episode"][0]["ticks"] <= 40  # point_mass/reach episodes end by 40 steps
    assert r["bad_observations"] == (r["ticks"] + 1) // 9  # every 9th observe() call, the first before the clock
    assert r["config"]["worker"] == ("thread" if "thread" in extra else "process")
    assert (r["config"]["backend"], r["config"]["precision"]) == (
        ("onnxruntime", "fp16") if "--backend" in extra else ("torch", "fp32"))
    assert r["inference_errors"] == 0 and r["decisions"] > 1
    # reaction: from reading an observation to sending the first action computed from it, at least the decision
    react, infer = r["reaction_ms"], r["inference_ms"]
    if "--anytime" not in extra:  # an anytime decider may skip every later decision on a tiny budget
        assert react["p50"] is not None and react["p50"] >= infer["p50"] * 0.5
        assert react["max"] <= infer["max"] + 1e3 / 50 * 3  # adopted within a few periods of finishing
    assert "deadline misses" in capsys.readouterr().out
    if "--chunking" in extra:
        assert r["config"]["chunking"] == extra[1]
    if extra[:2] in (["--chunking", "guidance"], ["--chunking", "inpaint"]):
        assert r["config"]["prefix_conditioning"]["method"] == extra[1]
    if extra[:2] == ["--chunking", "inpaint"]:  # RTI conditions its own warm tails
        assert r["config"]["rti"]["prefix"]["method"] == "inpaint"
    calls = r["denoiser_calls"]  # every decision's denoiser calls, the primed first one included
    assert sum(calls["decisions_by_calls"].values()) == r["decisions"]
    if not {"--rti", "--anytime"} & set(extra):
        assert calls["min"] == calls["max"] == r["config"]["steps"]
    if "--rti" in extra:  # a full denoise per episode, warm tails after
        assert calls["min"] < calls["max"]
    if "--anytime" in extra:
        assert r["config"]["anytime"]["mode"] == "truncate" and "skipped_decisions" in r
        assert calls["decisions_by_calls"].get("0", 0) == r["skipped_decisions"]
