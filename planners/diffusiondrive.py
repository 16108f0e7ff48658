"""DiffusionDrive (Liao et al., CVPR 2025): truncated diffusion from k-means anchors, decoded by a cascade.

    planner = DiffusionDrive(cfg, normalizer, anchors)     # anchors: (n_anchors, points, coords), normalised
    chunk = planner.predict_chunk({"ego": ..., "agents": ..., "bev": ...})
    chunk.action          # (B, 1, points * coords): the top-scoring plan, raw units (ego frame, metres, radians)
    chunk.extras          # "candidates" (B, n_anchors, points * coords), "scores" (B, n_anchors) in [0, 1]

Training noises every anchor to a step t < `train_t_max` of a `train_timesteps`-step scaled_linear schedule; the
cascade decoder predicts each trajectory's clean points (prediction type "sample") as offsets to its noisy input,
and a score per anchor. The loss is sigmoid focal (on the anchor nearest the ground truth) plus L1 (on that
anchor's prediction), summed over the cascade's layers. Inference noises the anchors to `init_t`, runs the shared
DDIM sampler over `timesteps` (one decoder pass each) and returns the last pass's clean prediction of the
top-scoring anchor, as the released code does. Every constant is a config field; the observation layout comes
from the dataset and is recorded in the checkpoint.

One difference from the released code, kept on purpose: it steps DDIM from each listed t to t - 1; the shared
sampler steps from each listed t to the next one listed (10 -> 0 here). The returned plan is the last pass's
prediction either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from torch import nn

from policy.checkpoint import load_planner_checkpoint, load_run_config
from policy.config import TrainConfig
from policy.contract import Chunk, GraphSpec, ObservationField, PolicySpec
from policy.diffusion import METHODS, NoiseSchedule, sample
from policy.normalizer import FieldNormalizer, Normalizer

from .driving_blocks import CascadeLayer, SceneEncoder, TimestepEmbedding, TrajectoryQuery
from .plans import plans_ahead

KIND = "diffusiondrive"
OBSERVATIONS = ("ego", "agents", "bev")


@dataclass
class SceneLayout:
    """The observation a driving planner was trained on; filled from the dataset, compared with the task's."""

    ego_dim: int = 0
    agents: int = 0
    agent_dim: int = 0
    bev_shape: list[int] = field(default_factory=list)  # [nx, ny, channels]
    bev_x: list[float] = field(default_factory=list)  # [m] the raster's extent ahead of / behind the ego
    bev_y: list[float] = field(default_factory=list)
    points: int = 8
    coords: int = 3  # x, y, heading
    dt: float = 0.5  # [s] between waypoints
    scene: dict = field(default_factory=dict)  # the dataset's scene settings, verbatim

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"ego": (self.ego_dim,), "agents": (self.agents, self.agent_dim), "bev": tuple(self.bev_shape)}


@dataclass
class DiffusionDriveConfig:
    layout: SceneLayout = field(default_factory=SceneLayout)
    d_model: int = 128
    heads: int = 4
    d_ffn: int = 256
    dropout: float = 0.0
    bev_hidden: int = 32
    agent_octaves: int = 0  # Fourier features of the agent tokens (0: the min-max normalised features alone)
    agents_see_ego: bool = False  # each agent token also reads the ego's features
    query_embed_dim: int = 16  # sine features per coordinate
    cascade_layers: int = 2
    n_anchors: int = 20
    train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    train_t_max: int = 50  # truncation: training noise t ~ U{0 .. train_t_max - 1}
    init_t: int = 8  # inference: the anchors noised to this step ...
    timesteps: list[int] = field(default_factory=lambda: [10, 0])  # ... then one decoder pass per listed step
    sampler: str = "ddim"
    cls_weight: float = 10.0
    reg_weight: float = 8.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25


@dataclass
class DriveDataConfig:
    task: str | None = None
    # The branch futures as extra (scene, plan) samples. Off by default: they are what the expert could have done,
    # not what it chose, and as positives for the classifier they make every lane equally right, so a planner that
    # replans each step switches lanes back and forth (a "keep" branch taken mid lane change pulls back to the lane
    # left): trained with them on highway-v0, it drove on the lane line and collided in 96% of episodes.
    branch_labels: bool = False
    val_ratio: float = 0.1  # episodes kept out of training (rtdp eval's open-loop figures use the eval seeds)
    normalizer_range_eps: float = 1e-2


@dataclass
class DiffusionDriveRunConfig:
    kind: str = KIND
    planner: DiffusionDriveConfig = field(default_factory=DiffusionDriveConfig)
    data: DriveDataConfig = field(default_factory=DriveDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2500, batch_size=64, lr=6e-4,
                                                                   warmup_steps=200, ema=False))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over elements."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).mean()


def kmeans_anchors(plans: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means (k-means++ seeding, scipy) over flattened normalised plans (N, points, coords) -> (k, points,
    coords)."""
    flat = plans.reshape(len(plans), -1).astype(np.float64)
    if len(flat) < k:
        raise ValueError(f"{k} anchors need at least {k} training plans, got {len(flat)}")
    centroids, _ = kmeans2(flat, k, minit="++", seed=seed)
    return centroids.reshape(k, *plans.shape[1:]).astype(np.float32)


def check_layout(layout: SceneLayout) -> None:
    if layout.ego_dim <= 0 or layout.agents <= 0 or len(layout.bev_shape) != 3:
        raise ValueError(f"the planner's scene layout is not set (filled from the dataset at training): {layout}")


class DiffusionDrive(nn.Module):
    kind = KIND
    scores_anchors = True  # its scores rank k-means anchors (the baselines built on its decoder have none)

    def __init__(self, cfg: DiffusionDriveConfig, normalizer: Normalizer, anchors: torch.Tensor | None = None):
        super().__init__()
        check_layout(cfg.layout)
        lay = cfg.layout
        if cfg.sampler not in METHODS:
            raise ValueError(f"planner.sampler must be one of {METHODS}, got {cfg.sampler!r}")
        if not 0 < cfg.train_t_max <= cfg.train_timesteps:
            raise ValueError(f"planner.train_t_max must be in [1, {cfg.train_timesteps}], got {cfg.train_t_max}")
        self.cfg = cfg
        self.normalizer = normalizer
        self.scene_encoder = SceneEncoder(lay.ego_dim, lay.agent_dim, lay.bev_shape[2], cfg.d_model, cfg.bev_hidden,
                                          cfg.agent_octaves, cfg.agents_see_ego)
        self.query = TrajectoryQuery(lay.points, lay.coords, cfg.query_embed_dim, cfg.d_model)
        self.time_embed = TimestepEmbedding(cfg.d_model)
        self.layers = nn.ModuleList(CascadeLayer(cfg.d_model, cfg.heads, cfg.d_ffn, lay.points, lay.coords,
                                                 cfg.dropout) for _ in range(cfg.cascade_layers))
        shape = (cfg.n_anchors, lay.points, lay.coords)
        self.register_buffer("anchors", torch.zeros(shape) if anchors is None else torch.as_tensor(anchors).float())
        if tuple(self.anchors.shape) != shape:
            raise ValueError(f"anchors must have shape {shape}, got {tuple(self.anchors.shape)}")
        # Normalised plan -> metres, per coordinate: where on the BEV a trajectory's points fall.
        plan = normalizer["action"]
        self.register_buffer("plan_scale", torch.as_tensor(plan.scale[: lay.coords]).float())
        self.register_buffer("plan_offset", torch.as_tensor(plan.offset[: lay.coords]).float())
        self.schedule = NoiseSchedule(cfg.train_timesteps, cfg.beta_schedule, "sample", clip_sample=True)
        self.configure_inference()

    # -- build-time settings --

    def configure_inference(self, sampler: str | None = None, steps: int | None = None) -> DiffusionDrive:
        """`sampler` replaces the config's; `steps` takes the first `steps` of the configured step list."""
        if sampler is not None:
            if sampler not in METHODS:
                raise ValueError(f"sampler must be one of {METHODS}, got {sampler!r}")
            self.cfg.sampler = sampler
        timesteps = [int(t) for t in self.cfg.timesteps]
        if steps is not None:
            if not 1 <= steps <= len(timesteps):
                raise ValueError(f"DiffusionDrive runs at most its {len(timesteps)} configured steps "
                                 f"{timesteps}; got steps={steps}")
            timesteps = timesteps[: steps - 1] + [timesteps[-1]] if steps > 1 else [timesteps[-1]]
        self.method, self.timesteps = self.cfg.sampler, timesteps
        return self

    def inference_config(self) -> dict:
        return {"sampler": self.method, "steps": len(self.timesteps), "timesteps": self.timesteps,
                "init_t": self.cfg.init_t, "anchors": self.cfg.n_anchors}

    @property
    def spec(self) -> PolicySpec:
        lay = self.cfg.layout
        fields = tuple(ObservationField(k, (1, *s), "float32") for k, s in lay.shapes().items())
        return PolicySpec(self.kind, fields, 1, lay.points * lay.coords, self.ticks_ahead, 0, 1, ())

    @property
    def model(self) -> DiffusionDrive:
        return self

    # -- outside the graph: validation and normalisation --

    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw scene (B, 1, ...) per field -> normalised (B, ...), refusing a missing field, a wrong shape and
        NaN or Inf by name."""
        out, batch = {}, None
        for f in self.spec.observations:
            if f.name not in obs:
                raise KeyError(f"scene is missing {f.name!r}; a DiffusionDrive planner observes "
                               f"{[g.name for g in self.spec.observations]}")
            x = torch.as_tensor(obs[f.name])
            if tuple(x.shape[1:]) != f.shape or x.dim() != len(f.shape) + 1:
                raise ValueError(f"scene field {f.name!r} must have shape (B, {', '.join(map(str, f.shape))}), got "
                                 f"{tuple(x.shape)}: a scene made with other settings than the checkpoint's")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"scene field {f.name!r} has batch {x.shape[0]}, the others {batch}")
            batch = x.shape[0]
            x = x.float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"scene field {f.name!r} holds NaN or Inf")
            out[f.name] = self.normalizer[f.name].normalize(x[:, 0])
        return out

    # -- the graph: normalised tensors in, normalised trajectories out --

    def to_grid(self, traj: torch.Tensor) -> torch.Tensor:
        """Normalised trajectories (B, K, P, C) -> their points in grid_sample coordinates on the BEV."""
        lay = self.cfg.layout
        xy = ((traj - self.plan_offset) / self.plan_scale)[..., :2]
        gx = 2 * (xy[..., 0] - lay.bev_x[0]) / (lay.bev_x[1] - lay.bev_x[0]) - 1  # along the raster's rows (nx)
        gy = 2 * (xy[..., 1] - lay.bev_y[0]) / (lay.bev_y[1] - lay.bev_y[0]) - 1  # along its columns (ny)
        return torch.stack([gy, gx], dim=-1)

    def encode(self, ego: torch.Tensor, agents: torch.Tensor, bev: torch.Tensor):
        return self.scene_encoder(ego, agents, bev)

    def decode(self, traj: torch.Tensor, t: torch.Tensor, scene) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One decoder pass over noisy trajectories (B, K, P, C): (scores (B, K), clean points) per cascade layer;
        each layer refines the previous layer's points."""
        bev_feat, tokens, present = scene
        time_emb = self.time_embed(t)
        points = traj.clamp(-1, 1)
        query = self.query(points)
        out = []
        for layer in self.layers:
            query, scores, refined = layer(query, points, self.to_grid(points), bev_feat, tokens, present, time_emb)
            out.append((scores, refined))
            points = refined.detach()
        return out

    def plan_normalized(self, scene, anchor_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The truncated denoise, one decoder pass per listed timestep: (the last pass's clean trajectories
        (B, K, P, C), its scores (B, K) as logits)."""
        batch = anchor_noise.shape[0]
        t0 = torch.full((batch,), self.cfg.init_t, dtype=torch.long, device=anchor_noise.device)
        x = self.schedule.add_noise(self.anchors.expand(batch, -1, -1, -1), anchor_noise, t0)
        last = {}

        def decoder(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            scores, points = self.decode(x_t, t, scene)[-1]
            last.update(scores=scores, points=points)
            return points

        sample(decoder, x, self.schedule, self.timesteps, self.method)
        return last["points"], last["scores"]

    def decide_normalized(self, ego, agents, bev, anchor_noise):
        """The whole decision as one graph (what export traces): normalised scene and anchor noise -> the clean
        candidates (B, K, P * C), normalised, and their scores (B, K) in [0, 1]."""
        points, scores = self.plan_normalized(self.encode(ego, agents, bev), anchor_noise)
        return points.flatten(2), scores.sigmoid()

    # -- the decision contract --

    def anchor_noise(self, batch: int, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        shape = (batch, *self.anchors.shape)
        if noise is None:
            return torch.randn(shape, generator=generator)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        return noise

    def reset(self) -> None:
        """A planner keeps nothing between decisions."""

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], *, executed: int | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Chunk:
        """The decision contract: raw scene -> the top-scoring plan. `noise` fixes the anchor noise (parity
        checks); `executed` is ignored (a planner keeps nothing between decisions)."""
        return self.chunk_from_graph(*self.decide_normalized(**self.graph_inputs(obs, generator, noise)))

    # The decision as one graph, for export and the engine backends: inputs from raw observations (validated and
    # normalised here, outside the graph), and the graph's outputs back to a chunk.
    decision_graph = "planner"

    def graph_inputs(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        nobs = self.normalize_obs(obs)
        return {**nobs, "anchor_noise": self.anchor_noise(nobs["ego"].shape[0], generator, noise)}

    def chunk_from_graph(self, candidates: torch.Tensor, scores: torch.Tensor) -> Chunk:
        """Normalised candidates (B, K, points * coords) and scores (B, K) -> a chunk: the selected plan for the
        observation's tick, and the same plan as the ego will see it at each of the next ticks while it follows it
        (what a control loop whose next decision is late executes)."""
        candidates = self.normalizer["action"].unnormalize(candidates)
        return self.chunk_for(candidates, scores, self.select(scores))

    def chunk_for(self, candidates: torch.Tensor, scores: torch.Tensor, best: torch.Tensor,
                  nfe: int | None = None) -> Chunk:
        """The chunk that executes candidate `best` (B,) of `candidates` (B, K, points * coords), raw units: what a
        check between the planner's ranking and the robot (planners.clearance) builds its decision with."""
        lay = self.cfg.layout
        plan = candidates[torch.arange(len(best)), best].reshape(-1, lay.points, lay.coords)
        ahead = plans_ahead(plan, lay.dt, self.tick_seconds, self.ticks_ahead).flatten(2)
        return Chunk(ahead[:, :1], ahead, ahead, len(self.timesteps) if nfe is None else nfe, "full",
                     extras={"candidates": candidates, "scores": scores, "best": best})

    @property
    def tick_seconds(self) -> float:
        return 1.0 / float(self.cfg.layout.scene.get("policy_frequency", 10))

    @property
    def ticks_ahead(self) -> int:
        """Ticks a plan covers before its first waypoint is reached: how late a next decision may be."""
        return max(1, round(self.cfg.layout.dt / self.tick_seconds))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The candidate each decision executes: the top-scoring one."""
        return scores.argmax(dim=1)

    def export_graphs(self, batch: int = 2, generator: torch.Generator | None = None) -> dict[str, GraphSpec]:
        """One graph for the whole decision: the scene encoder and every decoder pass of the truncated denoise."""
        shapes = self.cfg.layout.shapes()
        inputs = {k: torch.randn(batch, *s, generator=generator) for k, s in shapes.items()}
        inputs["agents"][..., 0] = (inputs["agents"][..., 0] > 0).float()
        inputs["anchor_noise"] = torch.randn(batch, *self.anchors.shape, generator=generator)
        return {self.decision_graph: GraphSpec(self.decide_normalized, inputs, ("candidates", "scores"))}

    # -- training --

    def compute_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Focal (x cls_weight) on the GT-nearest anchor's score plus L1 (x reg_weight) on its prediction, summed
        over the cascade's layers. `batch`: raw scene fields (B, 1, ...) and `plan` (B, points * coords)."""
        cfg, lay = self.cfg, self.cfg.layout
        nobs = self.normalize_obs({k: batch[k] for k in OBSERVATIONS})
        target = self.normalizer["action"].normalize(batch["plan"].float()).reshape(-1, lay.points, lay.coords)
        b = target.shape[0]
        mode = self.nearest_anchor(target)
        t = torch.randint(0, cfg.train_t_max, (b,), generator=generator)
        noise = torch.randn((b, *self.anchors.shape), generator=generator)
        noisy = self.schedule.add_noise(self.anchors.expand(b, -1, -1, -1), noise, t)
        onehot = F.one_hot(mode, cfg.n_anchors).float()
        loss = torch.zeros(())
        for scores, points in self.decode(noisy, t, self.encode(nobs["ego"], nobs["agents"], nobs["bev"])):
            cls = focal_loss(scores, onehot, cfg.focal_gamma, cfg.focal_alpha)
            reg = F.l1_loss(points[torch.arange(b), mode], target)
            loss = loss + cfg.cls_weight * cls + cfg.reg_weight * reg
        return loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss, so that DistributedDataParallel's hooks see the computation."""
        return self.compute_loss(batch)

    def metres(self, traj: torch.Tensor) -> torch.Tensor:
        """Normalised (..., P, C) -> the x, y of its points in metres (..., P, 2)."""
        return ((traj - self.plan_offset) / self.plan_scale)[..., :2]

    def anchor_distances(self, target: torch.Tensor) -> torch.Tensor:
        """(B, K): the mean point distance in metres from each normalised plan (B, P, C) to each anchor."""
        return (self.metres(target)[:, None] - self.metres(self.anchors)[None]).norm(dim=-1).mean(-1)

    def nearest_anchor(self, target: torch.Tensor) -> torch.Tensor:
        """The anchor each normalised plan (B, P, C) is nearest to (the positive in training)."""
        return self.anchor_distances(target).argmin(dim=1)

    def anchor_rank(self, target: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """How many anchors lie nearer each plan than the chosen one (0: the chosen one is the nearest)."""
        d = self.anchor_distances(target)
        return (d < d[torch.arange(len(d)), chosen][:, None]).sum(dim=1)


# -- building and loading ---------------------------------------------------------------------------------------


def fill_layout(cfg: DiffusionDriveConfig, data) -> None:
    """The scene layout from a driving dataset (`shapes()`, `scene`); a layout already set must agree."""
    shapes, scene = data.shapes(), data.scene
    lay = SceneLayout(shapes["ego"][0], shapes["agents"][0], shapes["agents"][1], list(shapes["bev"]),
                      list(scene["bev_x"]), list(scene["bev_y"]), int(scene["points"]), 3, float(scene["dt"]),
                      dict(scene))
    if cfg.layout.ego_dim and cfg.layout != lay:
        raise ValueError(f"planner.layout in the config differs from the dataset's scene: {cfg.layout} vs {lay}")
    cfg.layout = lay


def fit_scene_normalizer(data, points: int, coords: int, range_eps: float, max_scenes: int = 4000) -> Normalizer:
    """Min-max per feature for the scene (on up to `max_scenes` samples), per coordinate for the plans (the same
    map for every waypoint, so noise means the same distance along the whole plan). The agents' `present` flag
    stays 0/1: it masks attention."""
    idx = np.random.default_rng(0).permutation(len(data))[:max_scenes]
    scenes = data.scenes(idx)
    fields = {k: FieldNormalizer.fit_minmax(scenes[k], range_eps) for k in OBSERVATIONS}
    agents = fields["agents"]
    agents.scale[0], agents.offset[0] = 1.0, 0.0
    per_coord = FieldNormalizer.fit_minmax(data.plans().reshape(-1, coords), range_eps)
    fields["action"] = FieldNormalizer("minmax", np.tile(per_coord.scale, points), np.tile(per_coord.offset, points),
                                       {"min": np.tile(per_coord.stats["min"], points).tolist(),
                                        "max": np.tile(per_coord.stats["max"], points).tolist(),
                                        "per_coordinate": True})
    return Normalizer(fields)


def prepare_training(run_cfg: DiffusionDriveRunConfig, data) -> tuple[Normalizer, np.ndarray]:
    """Fill the planner's scene layout from a driving dataset; its normaliser, and the training plans normalised
    (N, points, coords)."""
    cfg = run_cfg.planner
    fill_layout(cfg, data)
    lay = cfg.layout
    normalizer = fit_scene_normalizer(data, lay.points, lay.coords, run_cfg.data.normalizer_range_eps)
    plans = normalizer["action"].normalize(data.plans()).reshape(-1, lay.points, lay.coords)
    return normalizer, plans


def build_for_training(run_cfg: DiffusionDriveRunConfig, data) -> DiffusionDrive:
    """A new planner for a driving dataset: its layout and normaliser from the data, its anchors by k-means over
    the training plans."""
    normalizer, plans = prepare_training(run_cfg, data)
    anchors = kmeans_anchors(plans, run_cfg.planner.n_anchors, seed=run_cfg.train.seed)
    return DiffusionDrive(run_cfg.planner, normalizer, torch.from_numpy(anchors))


def read_config(directory) -> DiffusionDriveRunConfig:
    return load_run_config(directory, DiffusionDriveRunConfig)


def load_planner(directory, planner_class: type = DiffusionDrive) -> tuple[DiffusionDrive, DiffusionDriveRunConfig]:
    """A driving planner checkpoint (DiffusionDrive, or a baseline built on its decoder: `planner_class`)."""
    return load_planner_checkpoint(directory, DiffusionDriveRunConfig, planner_class)
