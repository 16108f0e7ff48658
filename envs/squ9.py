"""The Squ-9-Gaussian toy (AAMDM, Li et al. 2024): a 2-D point near one of 9 grid centres jumps to a uniformly
random *other* centre, so every state has 8 equally likely successors far apart: the many-to-many transition a
few-step Gaussian denoiser blurs and a GAN step can keep.

    chain = squ9_chain(50_000, sigma=0.05, seed=0)    # ReplayBuffer, key "frame" (N, 2), one episode
    cells = nearest_cell(points)                       # index of the nearest centre, 0..8
"""

from __future__ import annotations

import numpy as np

from .datasets.replay_buffer import ReplayBuffer

SPACING = 1.0
CENTRES = np.array([(x, y) for y in (-SPACING, 0.0, SPACING) for x in (-SPACING, 0.0, SPACING)], np.float32)
SIGMA = 0.05


def squ9_chain(n_steps: int, sigma: float = SIGMA, seed: int = 0) -> ReplayBuffer:
    """A Markov chain of `n_steps` points: each one near a centre drawn uniformly among the 8 the previous point
    was not near."""
    if n_steps < 2:
        raise ValueError(f"a chain needs at least 2 steps, got {n_steps}")
    rng = np.random.default_rng(seed)
    cells = np.empty(n_steps, np.int64)
    cells[0] = rng.integers(9)
    jumps = rng.integers(1, 9, size=n_steps - 1)  # + 1..8 mod 9: uniform over the other 8 cells
    for i in range(1, n_steps):
        cells[i] = (cells[i - 1] + jumps[i - 1]) % 9
    points = CENTRES[cells] + rng.normal(0.0, sigma, size=(n_steps, 2)).astype(np.float32)
    return ReplayBuffer({"frame": points.astype(np.float32)}, [n_steps])


def points_near(cell: int, n: int, sigma: float = SIGMA, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (CENTRES[cell] + rng.normal(0.0, sigma, size=(n, 2))).astype(np.float32)


def nearest_cell(points: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(np.asarray(points)[:, None, :] - CENTRES[None], axis=-1)
    return d.argmin(axis=1)


def distance_to_nearest_centre(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(points)[:, None, :] - CENTRES[None], axis=-1).min(axis=1)


def transition_quality(start_cell: int, next_points: np.ndarray) -> dict:
    """How well successors of points near `start_cell` match the true transition: the other cells reached, the
    total-variation distance of their histogram to uniform over the other 8, how many stayed (the data never
    stays), and the median distance to the nearest centre (precision; the data's is about 1.18 sigma)."""
    cells = nearest_cell(next_points)
    counts = np.bincount(cells, minlength=9).astype(np.float64)
    p = counts / counts.sum()
    others = [c for c in range(9) if c != start_cell]
    target = np.zeros(9)
    target[others] = 1.0 / 8.0
    return {"cells_reached": int((counts[others] > 0).sum()), "tv_to_uniform": float(0.5 * np.abs(p - target).sum()),
            "stayed": float(p[start_cell]),
            "median_distance": float(np.median(distance_to_nearest_centre(next_points)))}
