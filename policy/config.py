"""Typed run configuration: dataclasses loaded from YAML, with dotted overrides from the command line.

    cfg = load_config("configs/policy/unet_lowdim.yaml", ["train.steps=500", "policy.unet.down_dims=[64,128,256]"])

An unknown key or a value of the wrong type is refused with the file (or the override) and the key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    pass


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    clip_sample: bool = True


@dataclass
class InferenceConfig:
    sampler: str = "ddim"  # ddpm | ddim | dpmpp_2m
    steps: int = 10
    spacing: str = "leading"  # how `steps` timesteps are spread over the schedule (diffusers' names)
    eta: float = 0.0


@dataclass
class UnetConfig:
    diffusion_step_embed_dim: int = 256
    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    cond_predict_scale: bool = True


@dataclass
class TransformerConfig:
    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.1
    causal_attn: bool = True


@dataclass
class ImageEncoderConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    num_kp: int = 32
    feature_dim: int = 64


@dataclass
class PolicyConfig:
    denoiser: str = "unet"  # unet | transformer
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    # Filled from the dataset at training time; a checkpoint's config always has them set.
    state_dim: int = 0
    action_dim: int = 0
    image_shape: list[int] | None = None  # [H, W] when the policy sees an RGB frame
    # Binary action dimensions (a gripper); None: the task's (envs.tasks.discrete_action_dims).
    discrete_action_dims: list[int] | None = None
    # RTI's "scale" variant: the discrete dims are trained (normalised) divided by this, so a short warm-started
    # denoise can flip them. 1 trains them like the others.
    discrete_action_scale: float = 1.0
    state_encoder_hidden: list[int] = field(default_factory=list)
    unet: UnetConfig = field(default_factory=UnetConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


@dataclass
class DataConfig:
    task: str | None = None  # the task the data came from; `rtdp train` fills it from the dataset's attributes
    tasks: list[str] = field(default_factory=list)  # a multi-task dataset's tasks, in the order of its task index
    state_keys: list[str] = field(default_factory=lambda: ["state"])  # concatenated into the state vector
    action_key: str = "action"
    image_key: str | None = None
    val_ratio: float = 0.0
    # Dimensions spanning less than this in the data are centred, not stretched to [-1, 1] (see normalizer.py).
    normalizer_range_eps: float = 1e-2


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 1e-6
    warmup_steps: int = 500
    ema: bool = True
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    threads: int = 0  # torch intra-op threads per process; 0: the machine's cores shared among local ranks


@dataclass
class RunConfig:
    # The model kind (deploy.kinds maps it to its config class and builder); a checkpoint written before the field
    # existed has none, and is a Diffusion Policy.
    kind: str = "diffusion_policy"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _merge(base, other, where: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: bad key {key!r}: {reason}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                config_class: type = RunConfig):
    """A run config of `config_class` (a model kind's; Diffusion Policy's by default) from YAML and overrides."""
    cfg = OmegaConf.structured(config_class)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            from_file = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and OmegaConf's own errors
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        cfg = _merge(cfg, from_file, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=500)")
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as e:  # OmegaConf's own errors, and YAML's for a value like [1,2
            reason = " ".join(str(e).split())[:160]
            raise ConfigError(f"override {item!r}: not a valid value: {reason}") from None
        cfg = _merge(cfg, dot, f"override {item!r}")
    return OmegaConf.to_object(cfg)


def config_from_dict(data: dict, where: str, config_class: type = RunConfig):
    return OmegaConf.to_object(_merge(OmegaConf.structured(config_class), OmegaConf.create(data), where))


def config_to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
