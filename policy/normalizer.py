"""Per-field linear normalisation kept outside the network graph, saved as JSON.

Low-dimensional fields are min-max mapped to [-1, 1] from the training data; uint8 images map [0, 255] to
[-1, 1]. The same object serves torch and exported graphs: the graph only ever sees normalised tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# A dimension whose range in the data is below this is not stretched to [-1, 1]: it is only centred. Stretching
# a dimension that barely moves in the demonstrations (metaworld's gripper opening spans 3e-3 in reach-v3
# demos) turns a small excursion at evaluation time into a normalised value of 100 and derails the policy.
RANGE_EPS = 1e-2


class FieldNormalizer:
    def __init__(self, kind: str, scale: np.ndarray, offset: np.ndarray, stats: dict | None = None):
        self.kind = kind
        self.scale = np.asarray(scale, dtype=np.float32)
        self.offset = np.asarray(offset, dtype=np.float32)
        self.stats = stats or {}
        self._torch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def fit_minmax(cls, data: np.ndarray, range_eps: float = RANGE_EPS) -> FieldNormalizer:
        flat = np.asarray(data, dtype=np.float64).reshape(-1, data.shape[-1])
        if not np.isfinite(flat).all():
            raise ValueError("cannot fit a normalizer on data that holds NaN or Inf")
        lo, hi = flat.min(axis=0), flat.max(axis=0)
        span = hi - lo
        const = span < range_eps
        scale = np.where(const, 1.0, 2.0 / np.where(const, 1.0, span))
        offset = np.where(const, -(lo + hi) / 2.0, -1.0 - scale * lo)
        return cls("minmax", scale, offset, {"min": lo.tolist(), "max": hi.tolist()})

    @classmethod
    def fit_standard(cls, data: np.ndarray, std_eps: float = 1e-6) -> FieldNormalizer:
        """Zero mean, unit variance per dim (a dimension that never moves is only centred): for features with
        long tails, where min-max would squeeze the bulk of the data near zero."""
        flat = np.asarray(data, dtype=np.float64).reshape(-1, data.shape[-1])
        if not np.isfinite(flat).all():
            raise ValueError("cannot fit a normalizer on data that holds NaN or Inf")
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        scale = 1.0 / np.where(std < std_eps, 1.0, std)
        return cls("standard", scale, -mean * scale, {"mean": mean.tolist(), "std": std.tolist()})

    def shrink(self, dims: list[int], factor: float) -> FieldNormalizer:
        """The same map with `dims` divided by `factor` after normalising (RTI's scaled discrete actions)."""
        scale, offset = self.scale.copy(), self.offset.copy()
        scale[list(dims)] /= factor
        offset[list(dims)] /= factor
        return FieldNormalizer(self.kind, scale, offset, {**self.stats, "shrunk_dims": list(dims),
                                                          "shrink_factor": factor})

    @classmethod
    def image(cls) -> FieldNormalizer:
        return cls("image", np.array([2.0 / 255.0]), np.array([-1.0]))

    def _params(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._torch:
            self._torch[key] = (torch.as_tensor(self.scale, device=like.device, dtype=like.dtype),
                                torch.as_tensor(self.offset, device=like.device, dtype=like.dtype))
        return self._torch[key]

    def normalize(self, x):
        if isinstance(x, torch.Tensor):
            x = x.float() if not x.dtype.is_floating_point else x
            scale, offset = self._params(x)
            return x * scale + offset
        return np.asarray(x, dtype=np.float32) * self.scale + self.offset

    def unnormalize(self, y):
        if isinstance(y, torch.Tensor):
            scale, offset = self._params(y)
            return (y - offset) / scale
        return (np.asarray(y, dtype=np.float32) - self.offset) / self.scale

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale": self.scale.tolist(), "offset": self.offset.tolist(), **self.stats}


class Normalizer:
    """Named field normalizers: typically `state`, `action` and, for image policies, `image`."""

    def __init__(self, fields: dict[str, FieldNormalizer] | None = None):
        self.fields = dict(fields or {})

    def __getitem__(self, name: str) -> FieldNormalizer:
        if name not in self.fields:
            raise KeyError(f"normalizer has no field {name!r}; it has {sorted(self.fields)}")
        return self.fields[name]

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def dim(self, name: str) -> int:
        return int(self.fields[name].scale.shape[-1])

    def save(self, path: str | Path) -> None:
        payload = {"version": 1, "fields": {k: v.to_dict() for k, v in self.fields.items()}}
        Path(path).write_text(json.dumps(payload, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
            fields = {}
            for name, f in payload["fields"].items():
                scale, offset = np.asarray(f["scale"], np.float32), np.asarray(f["offset"], np.float32)
                if scale.shape != offset.shape or scale.ndim != 1:
                    raise ValueError(f"field {name!r}: scale {scale.shape} and offset {offset.shape} must be equal 1-D")
                if not (np.isfinite(scale).all() and np.isfinite(offset).all()) or (scale == 0).any():
                    raise ValueError(f"field {name!r}: scale and offset must be finite and scale non-zero")
                stats = {k: v for k, v in f.items() if k not in ("kind", "scale", "offset")}
                fields[name] = FieldNormalizer(f["kind"], scale, offset, stats)
        except FileNotFoundError:
            raise FileNotFoundError(f"normalizer file {path} is missing") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid normalizer: {e}") from None
        return cls(fields)

