"""Per-dimension normalizers fitted on the dataset and saved in every checkpoint."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

KINDS = ("gaussian", "minmax")


class Normalizer:
    """Affine per-dimension map ``x ↦ (x − shift) / scale`` over the last axis.

    ``gaussian``: shift = mean, scale = std. ``minmax``: maps [min, max] to [−1, 1].
    ``clip_min``/``clip_max`` are the normalized data's per-dimension range, used to clip
    the sampler's estimate of the clean trajectory.
    """

    def __init__(self, *, kind: str, shift, scale, clip_min, clip_max):
        if kind not in KINDS:
            raise ValueError(f"unknown normalizer {kind!r}; choose one of {list(KINDS)}")
        self.kind = kind
        self.shift = torch.as_tensor(np.asarray(shift), dtype=torch.float32)
        self.scale = torch.as_tensor(np.asarray(scale), dtype=torch.float32)
        self.clip_min = torch.as_tensor(np.asarray(clip_min), dtype=torch.float32)
        self.clip_max = torch.as_tensor(np.asarray(clip_max), dtype=torch.float32)

    @classmethod
    def fit(cls, data: np.ndarray, *, kind: str = "gaussian", eps: float = 1e-6) -> "Normalizer":
        data = np.asarray(data, dtype=np.float64).reshape(-1, np.shape(data)[-1])
        if len(data) == 0:
            raise ValueError("no data to fit a normalizer to")
        if kind == "gaussian":
            shift, spread = data.mean(0), data.std(0)
        elif kind == "minmax":
            lo, hi = data.min(0), data.max(0)
            shift, spread = (hi + lo) / 2, (hi - lo) / 2
        else:
            raise ValueError(f"unknown normalizer {kind!r}; choose one of {list(KINDS)}")
        # A feature constant in the data is left unscaled: a floor of eps would multiply any other
        # value it takes later (a last state, an online observation) by 1/eps.
        scale = np.where(spread < eps, 1.0, spread)
        normed = (data - shift) / scale
        return cls(kind=kind, shift=shift, scale=scale, clip_min=normed.min(0), clip_max=normed.max(0))

    @property
    def dim(self) -> int:
        return int(self.shift.shape[0])

    def _params(self, x):
        """``x`` as floats (integers would truncate the parameters), with shift and scale to match."""
        if isinstance(x, torch.Tensor):
            x = x if torch.is_floating_point(x) else x.to(torch.get_default_dtype())
            return x, self.shift.to(device=x.device, dtype=x.dtype), self.scale.to(device=x.device, dtype=x.dtype)
        x = np.asarray(x)
        x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)
        return x, self.shift.numpy().astype(x.dtype, copy=False), self.scale.numpy().astype(x.dtype, copy=False)

    def normalize(self, x):
        x, shift, scale = self._params(x)
        return (x - shift) / scale

    def unnormalize(self, x):
        x, shift, scale = self._params(x)
        return x * scale + shift

    def slice(self, s: slice) -> "Normalizer":
        """The normalizer of a slice of the dimensions (e.g. the states of a trajectory row)."""
        return Normalizer(kind=self.kind, shift=self.shift[s], scale=self.scale[s], clip_min=self.clip_min[s], clip_max=self.clip_max[s])

    def state_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "shift": self.shift.clone(), "scale": self.scale.clone(),
                "clip_min": self.clip_min.clone(), "clip_max": self.clip_max.clone()}

    @classmethod
    def from_state_dict(cls, state: Dict[str, object]) -> "Normalizer":
        return cls(**state)
