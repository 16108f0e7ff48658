"""One worker's episodes: a built policy behind a timing adapter, on the task's seeds, one JSON record each.

Episode i of an evaluation always runs on seed EVAL_SEED_OFFSET + seed + i, with sampler noise seeded from the
same number: results do not depend on how episodes were split among workers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from envs.driving import DrivingTask
from envs.rollout import run_episode
from policy.contract import PolicyFault

EVAL_SEED_OFFSET = 100_000  # evaluation never reuses a demonstration seed (demos start at 0)
CALIBRATION_SEED_OFFSET = 200_000  # RTI's k0 and BAC calibration run on episodes neither demos nor evaluation use


def episode_seeds(seed: int, episodes: int) -> list[int]:
    return [EVAL_SEED_OFFSET + seed + i for i in range(episodes)]


class TimedPolicy:
    """Observation history (numpy) -> action chunk (numpy) for envs.rollout, recording each decision's inference
    time, denoiser calls, kind and branch evaluations from the returned chunk. Sampler noise is reseeded per
    episode, so an episode's rollout depends on its seed alone."""

    def __init__(self, policy):
        import torch

        self.policy = policy
        self.generator = torch.Generator()
        self.reset(0)

    def reset(self, seed: int, on_decision=None) -> None:
        """A new episode on `seed`; `on_decision(history, chunk)`, when given, sees every decision (a video)."""
        self.on_decision = on_decision
        self.generator.manual_seed(seed)
        self.latencies_ms: list[float] = []
        self.nfes: list[int] = []
        self.kinds: list[str] = []  # "full" or "warm" per decision
        self.block_evals: list[int | None] = []  # residual-branch evaluations, where a block cache counts them
        self.draft_steps: list[int] = []  # a planner's draft passes (Trajectory Diffuser), apart from nfe
        # decisions of each kind; RTI's full denoises forced by its warm start (NaN, an observation gap) and the
        # refreshes its staleness signals asked for
        self.fallbacks = {"full": 0, "warm": 0, "nan_fallbacks": 0, "gap_fallbacks": 0}
        self.policy.reset()

    def __call__(self, history: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        obs = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in history.items()}
        t0 = time.perf_counter()
        chunk = self.policy.predict_chunk(obs, generator=self.generator)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.nfes.append(chunk.nfe)
        self.kinds.append(chunk.kind)
        self.block_evals.append(chunk.block_evals)
        if "draft_steps" in chunk.extras:
            self.draft_steps.append(int(chunk.extras["draft_steps"]))
        self.fallbacks[chunk.kind] = self.fallbacks.get(chunk.kind, 0) + 1
        if "fallback" in chunk.extras:
            self.fallbacks[f"{chunk.extras['fallback']}_fallbacks"] += 1
        if self.on_decision is not None:
            self.on_decision(history, chunk)
        if "recipe_best" in chunk.extras:  # a clearance check ran: did it execute another candidate?
            changed = int((chunk.extras["recipe_best"] != chunk.extras["best"]).sum())
            self.fallbacks["clearance_overrides"] = self.fallbacks.get("clearance_overrides", 0) + changed
        if "refresh" in chunk.extras:
            key = f"{chunk.extras['refresh']}_refreshes"
            self.fallbacks[key] = self.fallbacks.get(key, 0) + 1
        return chunk.action[0].numpy()


def run_episodes(policy, env, n_obs_steps: int, seeds: list[int], task: str, emit, video_dir: str | None = None,
                 video_seeds: set[int] = frozenset()) -> None:
    """Run `policy` (the decision contract) on each seed and `emit` one record per episode."""
    act = TimedPolicy(policy)
    # A driving plan is drawn from the decision itself (its candidates and scores); other tasks render the scene.
    draws_decisions = isinstance(env, DrivingTask)
    for seed in seeds:
        frames: list[np.ndarray] = []
        predictions: list[np.ndarray] = []  # a frame-predicting policy's (PAD's) predicted frames per decision
        on_decision = None
        if seed in video_seeds:
            on_decision = decision_drawer(env, frames) if draws_decisions else prediction_recorder(predictions)
        act.reset(seed, on_decision)
        try:
            result = run_episode(env, act, n_obs_steps, seed,
                                 record_frames=seed in video_seeds and not draws_decisions)
        except PolicyFault as e:
            raise PolicyFault(f"{e} (episode seed {seed}, decision {len(act.nfes) + 1})") from None
        if predictions:
            result.frames = beside_predictions(result.frames, predictions, policy.spec.n_action_steps)
        frames = frames or result.frames
        fps = env.scene.policy_frequency if draws_decisions else 30
        video = write_video(frames, Path(video_dir), task, seed, fps) if frames else None
        emit({"seed": seed, "success": result.success, "return": result.total_return, "steps": result.steps,
              "decisions": result.decisions, "latency_ms": act.latencies_ms, "nfe": act.nfes, "kind": act.kinds,
              "block_evals": act.block_evals, "fallbacks": dict(act.fallbacks), "video": video,
              **({"draft_steps": act.draft_steps} if act.draft_steps else {}),
              **({"metrics": result.metrics} if result.metrics else {})})


def decision_drawer(env, frames: list):
    """Append a top-down frame of every driving decision (scene, candidates shaded by score, the chosen plan)."""
    from .driving_video import draw_decision

    def draw(history: dict[str, np.ndarray], chunk) -> None:
        scene = {k: v[-1] for k, v in history.items()}
        extras = {k: v[0].numpy() for k, v in chunk.extras.items() if k in ("candidates", "scores")}
        frames.append(draw_decision(scene, extras, chunk.action[0, 0].numpy(), env.scene.bev_x, env.scene.bev_y))

    return draw


def prediction_recorder(predictions: list):
    """Keep each decision's predicted frames (chunk.extras["frames"], (frames, H, W, 3) uint8), when it has some."""

    def record(_history: dict[str, np.ndarray], chunk) -> None:
        if "frames" in chunk.extras:
            predictions.append(chunk.extras["frames"][0].numpy())

    return record


def beside_predictions(frames: list[np.ndarray], predictions: list[np.ndarray], every: int) -> list[np.ndarray]:
    """Each rollout frame with, to its right, the frames the latest decision predicted, stacked top to bottom
    (nearest-neighbour scaled to a third of the rollout's height each). Decision d runs steps d*every ... ."""
    out = []
    for s, frame in enumerate(frames):
        pred = predictions[min(max(s - 1, 0) // every, len(predictions) - 1)]
        n, h = len(pred), frame.shape[0] // len(pred)
        rows = np.arange(h) * pred.shape[1] // h
        cols = np.arange(h) * pred.shape[2] // h
        column = np.concatenate([p[rows][:, cols] for p in pred], axis=0)
        column = np.pad(column, ((0, frame.shape[0] - n * h), (0, 0), (0, 0)))
        out.append(np.concatenate([frame, column], axis=1))
    return out


def write_video(frames: list[np.ndarray], directory: Path, task: str, seed: int, fps: int = 30) -> str:
    import imageio.v2 as imageio

    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{task.replace('/', '_')}_seed{seed}"
    try:
        path = directory / f"{stem}.mp4"
        imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
    except (ImportError, ValueError, RuntimeError):  # no ffmpeg backend: fall back to a GIF
        path = directory / f"{stem}.gif"
        imageio.mimwrite(path, frames, duration=1.0 / fps)
    return str(path)
