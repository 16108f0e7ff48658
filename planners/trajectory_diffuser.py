"""Trajectory Diffuser (Huang et al., ECCV 2024): an autoregressive draft of the state plan, refined by a few steps
of a return-conditioned diffusion model, then an action from inverse dynamics and a critic's choice.

    planner = TrajectoryDiffuser(cfg, normalizer)
    chunk = planner.predict_chunk({"state": (B, 1, S)})
    chunk.action          # (B, k, A): the chosen candidate's first action(s), raw units (k = actions_per_decision)
    chunk.extras          # "candidates" (B, K, k, A), "scores" (B, K) (the critic's Q), "plans" (B, K, H, S),
                          # "draft_steps" (the draft's forward passes; the denoiser's calls are chunk.nfe)

One decision, as the released code's `select_action` makes it:
1. the causal transformer (planners/draft_transformer.py) rolls out H - 1 states from the current state and the
   target return (`target_return` x the data's highest initial return-to-go);
2. the temporal U-Net (Janner's, policy/nets/unet1d.py) refines that draft for `refine_steps` steps of the shared
   sampler with classifier-free guidance on the return (weight `guidance_weight`), entering at
   t = refine_steps - 1 of its `train_timesteps`-step linear schedule: the draft used as x_t itself (`entry:
   direct`, the released code) or forward-noised to t first (`entry: renoise`); the first state is held at the
   current one before every call and at the end;
3. for `candidates` copies (one draft; the stochastic sampler makes them differ), inverse dynamics a = f(s_0, s_1)
   (or f(s_0, s_1 .. s_c), `inverse_context` c) and a critic Q(s_0, a) regressed on the return-to-go; one candidate
   drawn from softmax(Q / temperature) (by the Gumbel-max trick, so the draw is an input of the exported graph).
`refine_steps: 0` is the draft alone. Decision-Diffuser-style planning (from noise, every step) is
planners/decision_diffuser.py, Diffuser-style planning (from noise, value-guided) planners/diffuser.py, both built on
the same parts. Learned variance and the Adroit 2-step setting are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policy.checkpoint import load_planner_checkpoint, load_run_config
from policy.config import TrainConfig
from policy.contract import Chunk, GraphSpec, ObservationField, PolicySpec
from policy.diffusion import METHODS, NoiseSchedule, sample
from policy.nets.unet1d import ConditionalUnet1D
from policy.normalizer import FieldNormalizer, Normalizer

from .draft_transformer import DraftTransformer

KIND = "trajectory_diffuser"
ENTRIES = ("direct", "renoise")


@dataclass
class TrajectoryDiffuserConfig:
    state_dim: int = 0  # filled from the dataset
    action_dim: int = 0
    horizon: int = 32
    # Environment steps between consecutive planned states (1: the reference's). k > 1 plans every k-th state, so H
    # states span (H - 1) k steps at H's cost: a maze route longer than H steps fits the plan without the 4x
    # longer sequences Diffuser's H = 256 trains on. The inverse model then reads states k steps apart.
    plan_stride: int = 1
    # the draft: a causal transformer over (state, return-to-go)
    draft_d_model: int = 256
    draft_heads: int = 4
    draft_layers: int = 4
    draft_d_ff: int = 512
    draft_dropout: float = 0.1
    # the refiner: Janner's temporal U-Net over states, epsilon prediction, classifier-free guidance on the return
    down_dims: list[int] = field(default_factory=lambda: [16, 32, 64])  # sized for a CPU: 32 candidates x CFG
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 64
    return_embed_dim: int = 64
    train_timesteps: int = 100
    beta_schedule: str = "linear"
    beta_start: float = 1e-3
    beta_end: float = 2e-2
    condition_dropout: float = 0.25
    guidance_weight: float = 1.2
    refine_steps: int = 5  # enter at t = refine_steps - 1; 0: the draft alone
    # The U-Net trains on t < this (0: the whole schedule, the released code). A refiner that only ever enters at
    # t < refine_steps can spend all its training on the low noise levels, where its error becomes the action's.
    refine_train_timesteps: int = 0
    entry: str = "direct"  # direct | renoise
    sampler: str = "ddpm"
    # actions
    candidates: int = 32
    inverse_hidden: int = 256
    # Inverse dynamics a_j = f(s_j, s_j+1 .. s_j+inverse_context); 1 is the reference's f(s_0, s_1). A refined plan's
    # next state is off by the U-Net's error at its lowest noise level, which in a large maze is several of the
    # data's steps, and f(s_0, s_1) turns that jump into a wrong action. Reading further along the plan, trained on
    # planned states roughened by `inverse_noise` (normalised units: a shift shared by the states read plus one of
    # its own for each), lets the plan's course carry the action rather than its first step.
    inverse_context: int = 1
    inverse_noise: float = 0.0
    critic_hidden: int = 256
    select_temperature: float = 1.0
    actions_per_decision: int = 1  # > 1: the chosen plan's first actions run open loop (a slow baseline replans less)
    target_return: float = 0.9  # x the data's highest initial return-to-go
    return_scale: float = 0.0  # return-to-go / return_scale is what the networks see; filled from the data
    # loss weights (a baseline that has no draft trains without it)
    draft_weight: float = 1.0
    inverse_weight: float = 1.0
    critic_weight: float = 1.0
    # the Diffuser-style baseline's value guidance (planners/diffuser.py); the other kinds have no value net
    value_weight: float = 1.0
    value_hidden: int = 256
    guide_scale: float = 0.1
    guide_stop_t: int = 2  # no guidance below this noise level (Janner's t_stopgrad)


@dataclass
class OfflineDataConfig:
    task: str | None = None
    discount: float = 0.99
    reference_returns: dict = field(default_factory=dict)  # D4RL's normalised-score references, from the dataset
    normalizer_range_eps: float = 1e-2


@dataclass
class TrajectoryDiffuserRunConfig:
    kind: str = KIND
    planner: TrajectoryDiffuserConfig = field(default_factory=TrajectoryDiffuserConfig)
    data: OfflineDataConfig = field(default_factory=OfflineDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=4000, batch_size=64, lr=2e-4,
                                                                   warmup_steps=200, ema=True))


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(),
                         nn.Linear(hidden, d_out))


class ReturnEmbedding(nn.Module):
    """The return condition as the U-Net's global condition; `keep` 0 is the unconditional model (zeros)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, dim), nn.Mish(), nn.Linear(dim, dim))

    def forward(self, returns: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.net(returns[:, None]) * keep[:, None]


class TrajectoryDiffuser(nn.Module):
    kind = KIND
    has_draft = True

    def __init__(self, cfg: TrajectoryDiffuserConfig, normalizer: Normalizer):
        super().__init__()
        if cfg.state_dim <= 0 or cfg.action_dim <= 0:
            raise ValueError(f"planner.state_dim and action_dim are filled from the dataset; got {cfg.state_dim}, "
                             f"{cfg.action_dim}")
        if cfg.entry not in ENTRIES:
            raise ValueError(f"planner.entry must be one of {ENTRIES}, got {cfg.entry!r}")
        if cfg.plan_stride < 1:
            raise ValueError(f"planner.plan_stride must be >= 1, got {cfg.plan_stride}")
        if cfg.plan_stride > 1 and cfg.actions_per_decision != 1:
            raise ValueError(f"planner.plan_stride {cfg.plan_stride} plans every {cfg.plan_stride}-th state, so only "
                             f"the first action is planned: actions_per_decision must be 1, got "
                             f"{cfg.actions_per_decision}")
        if not 1 <= cfg.actions_per_decision < cfg.horizon:
            raise ValueError(f"planner.actions_per_decision must be in [1, {cfg.horizon - 1}], got "
                             f"{cfg.actions_per_decision}")
        if not 1 <= cfg.inverse_context <= cfg.horizon - cfg.actions_per_decision:
            raise ValueError(f"planner.inverse_context must be in [1, {cfg.horizon - cfg.actions_per_decision}] "
                             f"(horizon {cfg.horizon} - actions_per_decision {cfg.actions_per_decision}), got "
                             f"{cfg.inverse_context}")
        if not cfg.inverse_noise >= 0:
            raise ValueError(f"planner.inverse_noise must be >= 0, got {cfg.inverse_noise}")
        if cfg.return_scale <= 0:
            raise ValueError(f"planner.return_scale must be > 0 (filled from the data), got {cfg.return_scale}")
        if not 0 <= cfg.refine_train_timesteps <= cfg.train_timesteps:
            raise ValueError(f"planner.refine_train_timesteps must be in [0, {cfg.train_timesteps}] (0: all), got "
                             f"{cfg.refine_train_timesteps}")
        if cfg.refine_train_timesteps and not self.has_draft:
            raise ValueError("planner.refine_train_timesteps trains the U-Net on low noise only; a planner that "
                             "denoises from pure noise needs the whole schedule: leave it 0")
        factor = 2 ** (len(cfg.down_dims) - 1)
        if cfg.horizon % factor:
            raise ValueError(f"planner.horizon must be divisible by {factor} for down_dims {cfg.down_dims}, got "
                             f"{cfg.horizon}")
        self.cfg = cfg
        self.normalizer = normalizer
        if self.has_draft:
            self.draft = DraftTransformer(cfg.state_dim, cfg.horizon, cfg.draft_d_model, cfg.draft_heads,
                                          cfg.draft_layers, cfg.draft_d_ff, cfg.draft_dropout)
        self.unet = ConditionalUnet1D(cfg.state_dim, cfg.return_embed_dim, cfg.step_embed_dim, cfg.down_dims,
                                      cfg.kernel_size, cfg.n_groups)
        self.return_embed = ReturnEmbedding(cfg.return_embed_dim)
        self.inverse = mlp((1 + cfg.inverse_context) * cfg.state_dim, cfg.inverse_hidden, cfg.action_dim)
        self.critic = mlp(cfg.state_dim + cfg.action_dim, cfg.critic_hidden, 1)
        self.schedule = NoiseSchedule(cfg.train_timesteps, cfg.beta_schedule, "epsilon", cfg.beta_start,
                                      cfg.beta_end)
        self.configure_inference()

    # -- build-time settings --

    def configure_inference(self, sampler: str | None = None, steps: int | None = None) -> TrajectoryDiffuser:
        """`steps`: the refinement's steps from the draft (0: the draft alone)."""
        cfg = self.cfg
        if sampler is not None:
            cfg.sampler = sampler
        if cfg.sampler not in METHODS:
            raise ValueError(f"sampler must be one of {METHODS}, got {cfg.sampler!r}")
        if steps is not None:
            cfg.refine_steps = steps
        if not 0 <= cfg.refine_steps <= cfg.train_timesteps:
            raise ValueError(f"the refinement runs 0 to {cfg.train_timesteps} steps, got {cfg.refine_steps}")
        if cfg.refine_train_timesteps and cfg.refine_steps > cfg.refine_train_timesteps:
            raise ValueError(f"this refiner was trained on t < {cfg.refine_train_timesteps} only; a {cfg.refine_steps}"
                             f"-step refinement would enter at t = {cfg.refine_steps - 1}")
        self.method = cfg.sampler
        self.timesteps = list(range(cfg.refine_steps - 1, -1, -1))
        return self

    def inference_config(self) -> dict:
        cfg = self.cfg
        return {"sampler": self.method, "steps": len(self.timesteps), "timesteps": self.timesteps,
                "start": "draft", "entry": cfg.entry, "draft_steps": cfg.horizon - 1,
                "plan_stride": cfg.plan_stride,
                "guidance_weight": cfg.guidance_weight, "candidates": cfg.candidates,
                "target_return": cfg.target_return, "actions_per_decision": cfg.actions_per_decision}

    @property
    def spec(self) -> PolicySpec:
        k = self.cfg.actions_per_decision
        return PolicySpec(self.kind, (ObservationField("state", (1, self.cfg.state_dim), "float32"),), 1,
                          self.cfg.action_dim, k, 0, k, ())

    @property
    def model(self) -> TrajectoryDiffuser:
        return self

    @property
    def draft_steps(self) -> int:
        return self.cfg.horizon - 1

    # -- outside the graph --

    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        if "state" not in obs:
            raise KeyError(f"observation is missing 'state'; a {self.kind} planner observes ['state']")
        x = torch.as_tensor(obs["state"])
        if x.dim() != 3 or tuple(x.shape[1:]) != (1, self.cfg.state_dim):
            raise ValueError(f"observation 'state' must have shape (B, 1, {self.cfg.state_dim}), got "
                             f"{tuple(x.shape)}")
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("observation 'state' holds NaN or Inf")
        return self.normalizer["state"].normalize(x[:, 0])

    # -- the parts --

    def guided_denoiser(self, first_state: torch.Tensor, returns: torch.Tensor):
        """The classifier-free-guided epsilon of plans whose first state is held at `first_state`."""
        cond = self.return_embed(returns, torch.ones_like(returns))
        uncond = torch.zeros_like(cond)
        w = self.cfg.guidance_weight

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = hold_first(x, first_state)
            eps = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
            eps_cond, eps_uncond = eps.chunk(2)
            return eps_uncond + w * (eps_cond - eps_uncond)

        return denoise

    def start(self, state: torch.Tensor, returns: torch.Tensor, entry_noise: torch.Tensor) -> torch.Tensor:
        """Where the refinement starts, for each of the B * K candidates (`entry_noise` (B * K, H, S)): the draft
        (B rollouts, the same for each candidate of a decision), forward-noised to the entry step when
        `entry: renoise`."""
        k = self.cfg.candidates
        draft = self.draft.rollout(state, returns).repeat_interleave(k, dim=0)
        if self.cfg.entry == "renoise" and self.timesteps:
            t = torch.full((draft.shape[0],), self.timesteps[0], dtype=torch.long)
            draft = hold_first(self.schedule.add_noise(draft, entry_noise, t), draft[:, 0])
        return draft

    def inverse_inputs(self, states: torch.Tensor, count: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H, S) states -> (N, count, (1 + c) * S): for each of the first `count` steps, its state and the c
        after it (c = inverse_context). `noise` (N, count, c, S) is added to the states after it."""
        c = self.cfg.inverse_context
        ahead = torch.stack([states[:, j:j + count] for j in range(1, c + 1)], dim=2)
        if noise is not None:
            ahead = ahead + noise
        return torch.cat([states[:, :count], ahead.flatten(2)], dim=-1)

    def inverse_roughening(self, batch: int, count: int, generator: torch.Generator | None = None):
        """Training noise (batch, count, c, S) for the states the inverse model reads ahead: a shift shared by the c
        states plus one of each's own, both of std `inverse_noise`; None when it is 0."""
        cfg = self.cfg
        if cfg.inverse_noise <= 0:
            return None
        shape = (batch, count, cfg.inverse_context, cfg.state_dim)
        return cfg.inverse_noise * (torch.randn((batch, count, 1, cfg.state_dim), generator=generator)
                                    + torch.randn(shape, generator=generator))

    def inverse_loss(self, states: torch.Tensor, actions: torch.Tensor, valid: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Inverse dynamics' MSE on normalised windows (B, H, S) / (B, H, A), over the steps whose last state read is
        a real one (`valid` is a prefix of each window), the states read ahead roughened."""
        count = states.shape[1] - self.cfg.inverse_context
        rough = self.inverse_roughening(states.shape[0], count, generator)
        err = F.mse_loss(self.inverse(self.inverse_inputs(states, count, rough)), actions[:, :count],
                         reduction="none").mean(-1)
        pair = valid[:, self.cfg.inverse_context:].float()
        return (err * pair).sum() / pair.sum().clamp(min=1.0)

    def actions_and_values(self, plans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H, S) plans -> each one's first `actions_per_decision` actions (N, k, A) by inverse dynamics along
        the planned states, and the critic's value of its first action (N,)."""
        k = self.cfg.actions_per_decision
        # held to the range the actions were seen in: an inverse model extrapolating between two planned states the
        # data never joined would otherwise command more than any demonstration did
        actions = self.inverse(self.inverse_inputs(plans, k)).clamp(-1, 1)
        return actions, self.critic(torch.cat([plans[:, 0], actions[:, 0]], dim=-1))[:, 0]

    def decide_normalized(self, state, target_return, entry_noise, refine_noise, selection_noise):
        """The whole decision as one graph (what export traces). Normalised state (B, S), target return (B,) in
        return_scale units, the entry's noise (B, K, H, S) and each step's (B, steps, K, H, S) for the K
        candidates, and uniform noise (B, K) for the choice -> candidate actions (B, K, k, A), their values
        (B, K), the plans (B, K, H, S), the chosen candidate (B,)."""
        cfg = self.cfg
        b, k = state.shape[0], cfg.candidates
        entry_noise = entry_noise.flatten(0, 1)
        step_noise = refine_noise.transpose(0, 1).flatten(1, 2)
        first = state.repeat_interleave(k, dim=0)
        returns = target_return.repeat_interleave(k, dim=0)
        plans = self.start(state, target_return, entry_noise)
        if self.timesteps:
            plans = sample(self.guided_denoiser(first, returns), plans, self.schedule, self.timesteps, self.method,
                           step_noise=step_noise)
        plans = hold_first(plans, first).clamp(-1, 1)
        actions, values = self.actions_and_values(plans)
        values = values.reshape(b, k)
        gumbel = -torch.log(-torch.log(selection_noise.clamp(1e-9, 1 - 1e-9)))
        best = (values / cfg.select_temperature + gumbel).argmax(dim=1)
        return (actions.reshape(b, k, cfg.actions_per_decision, -1), values, plans.reshape(b, k, cfg.horizon, -1),
                best)

    # -- the decision contract --

    def reset(self) -> None:
        """A planner keeps nothing between decisions."""

    def target(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.cfg.target_return, dtype=torch.float32)

    def noise_inputs(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        shape = (cfg.candidates, cfg.horizon, cfg.state_dim)
        return {"entry_noise": torch.randn((batch, *shape), generator=generator),
                "refine_noise": torch.randn((batch, max(1, len(self.timesteps)), *shape), generator=generator),
                "selection_noise": torch.rand((batch, cfg.candidates), generator=generator)}

    decision_graph = "planner"

    def graph_inputs(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        state = self.normalize_obs(obs)
        return {"state": state, "target_return": self.target(state.shape[0]),
                **self.noise_inputs(state.shape[0], generator)}

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], *, executed: int | None = None,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Chunk:
        return self.chunk_from_graph(*self.decide_normalized(**self.graph_inputs(obs, generator, noise)))

    def chunk_from_graph(self, candidates, values, plans, best) -> Chunk:
        actions = self.normalizer["action"].unnormalize(candidates)
        chosen = actions[torch.arange(len(best)), best.long()]
        plans = self.normalizer["state"].unnormalize(plans)
        return Chunk(chosen, chosen, chosen, len(self.timesteps), "full",
                     extras={"candidates": actions, "scores": values, "plans": plans, "best": best,
                             "draft_steps": self.draft_steps})

    def export_graphs(self, batch: int = 2, generator: torch.Generator | None = None) -> dict[str, GraphSpec]:
        """One graph for the whole decision: the draft's rollout, every refinement step, inverse dynamics, critic
        and the choice."""
        inputs = {"state": torch.rand(batch, self.cfg.state_dim, generator=generator) * 2 - 1,
                  "target_return": self.target(batch), **self.noise_inputs(batch, generator)}
        return {self.decision_graph: GraphSpec(self.decide_normalized, inputs,
                                               ("candidates", "scores", "plans", "best"))}

    # -- training --

    def compute_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion (epsilon MSE, the first state's noise zeroed, the return dropped with probability
        condition_dropout) + draft (next state and return) + inverse dynamics + critic (regression on the
        return-to-go). `batch`: raw windows `states` (B, H, S), `actions` (B, H, A), `rtg` (B, H), `valid`."""
        cfg = self.cfg
        states = self.normalizer["state"].normalize(batch["states"].float())
        actions = self.normalizer["action"].normalize(batch["actions"].float())
        rtg = batch["rtg"].float() / cfg.return_scale
        valid = batch["valid"].bool()
        b = states.shape[0]
        t = torch.randint(0, cfg.refine_train_timesteps or cfg.train_timesteps, (b,), generator=generator)
        noise = torch.randn(states.shape, generator=generator)
        noise[:, 0] = 0.0
        noisy = hold_first(self.schedule.add_noise(states, noise, t), states[:, 0])
        keep = (torch.rand(b, generator=generator) >= cfg.condition_dropout).float()
        eps = self.unet(noisy, t, self.return_embed(rtg[:, 0], keep))
        loss = F.mse_loss(eps, noise)
        loss = loss + cfg.inverse_weight * self.inverse_loss(states, actions, valid, generator)
        q = self.critic(torch.cat([states[:, 0], actions[:, 0]], dim=-1))[:, 0]
        loss = loss + cfg.critic_weight * F.mse_loss(q, rtg[:, 0])
        if self.has_draft and cfg.draft_weight > 0:
            loss = loss + cfg.draft_weight * self.draft.loss(states, rtg, valid)
        return loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compute_loss(batch)


def hold_first(plans: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Plans (N, H, S) with their first state replaced by `first` (N, S): Diffuser's inpainting of the start."""
    return torch.cat([first[:, None], plans[:, 1:]], dim=1)


# -- building and loading ---------------------------------------------------------------------------------------


def prepare_training(run_cfg: TrajectoryDiffuserRunConfig, data) -> Normalizer:
    """Fill the planner's sizes and return scale from a TrajectoryDataset; its normaliser (min-max per dim)."""
    cfg = run_cfg.planner
    if data.horizon != cfg.horizon:
        raise ValueError(f"the dataset's windows are {data.horizon} steps, planner.horizon is {cfg.horizon}")
    if data.stride != cfg.plan_stride:
        raise ValueError(f"the dataset's windows take every {data.stride}-th step, planner.plan_stride is "
                         f"{cfg.plan_stride}")
    cfg.state_dim, cfg.action_dim = int(data.state_dim), int(data.action_dim)
    cfg.return_scale = float(np.abs(data.initial_returns()).max()) or 1.0
    eps = run_cfg.data.normalizer_range_eps
    return Normalizer({"state": FieldNormalizer.fit_minmax(data.all_states(), eps),
                       "action": FieldNormalizer.fit_minmax(data.all_actions(), eps)})


def build_for_training(run_cfg: TrajectoryDiffuserRunConfig, data) -> TrajectoryDiffuser:
    return TrajectoryDiffuser(run_cfg.planner, prepare_training(run_cfg, data))


def read_config(directory) -> TrajectoryDiffuserRunConfig:
    return load_run_config(directory, TrajectoryDiffuserRunConfig)


def load_planner(directory, planner_class: type = TrajectoryDiffuser):
    return load_planner_checkpoint(directory, TrajectoryDiffuserRunConfig, planner_class)
