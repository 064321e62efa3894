"""What crosses Ray between the driver and its actors, as named tuples: a field is read by name,
and a misspelt one fails where it is read, not as a missing dict key far from the actor that
made the result. State dicts (a checkpoint's learner and replay) cross with their tensors packed
(:func:`pack_tensors`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from distdiff.checkpoint import map_leaves

if TYPE_CHECKING:  # annotations only: distdiff.distributed.learner, which imports this, imports no env code
    from distdiff.data.episodes import Episode
    from distdiff.rollout import PlanCheck


class Weights(NamedTuple):
    """One published version of the planner's nets: what the learner's ``publish`` returns, one
    object in the object store per version (as a ``ray.put`` of it would be), handed to every
    worker by reference."""

    version: int
    weights: Dict[str, np.ndarray]  # net name -> its state dict as one flat float32 array (training.flat_weights)


class RolloutResult(NamedTuple):
    """One rollout task of a worker: an episode per env it ran."""

    worker_id: int
    version: int  # the weights version its plans were made with
    episodes: List[Episode]
    returns: List[float]  # per episode
    lengths: List[int]  # per episode
    plan_errors: np.ndarray  # [measured plans, H]: each one's per-step distance to the states it reached
    env_steps: int
    env_rebuilds: int  # in this task: 1 when its envs failed and it ran again on new ones
    example: Optional[PlanCheck]  # the last measured plan of the first episode with one, for the plan-vs-real figure


class TrainStats(NamedTuple):
    """One learner call: its updates and what they measured."""

    losses: Dict[str, float]  # TensorBoard tag (losses/...) -> mean over the updates done
    updates: int  # done; non-finite ones are skipped, not done
    skipped: int
    seconds: float
    windows: int  # trajectory windows trained on
    learning_rate: float  # the denoiser's, as pretraining logs it (phase 2's: train.lr x online.lr_scale)


class WorkerState(NamedTuple):
    worker_id: int
    version: int  # of the weights it holds; -1 before any
    tasks: int  # rollouts it ran since its process started


class TensorBytes(NamedTuple):
    """A CPU tensor as it crosses Ray in a state dict: its bytes as a numpy array, which Ray's
    pickle hands over out of band, zero-copy, where it pickles a tensor through ``torch.save``
    one at a time (a learner's state holds hundreds: 705 at the default model, fetched in 123 ms
    as tensors against 30-36 ms packed, ``bench/checkpoint.py``)."""

    data: np.ndarray  # uint8, the tensor's contiguous bytes
    dtype: str  # torch's name, without "torch." (bfloat16 too, which numpy has not)
    shape: Tuple[int, ...]


def pack_tensors(obj):
    """``obj`` with every tensor in its dicts, lists and tuples as :class:`TensorBytes`, for an
    actor's method to return or a driver to pass; :func:`unpack_tensors` restores it."""
    return map_leaves(obj, torch.is_tensor, _packed)


def unpack_tensors(obj):
    """``obj`` with every :class:`TensorBytes` a tensor again, in memory of its own: what Ray
    hands over maps its object store read-only, and would be held there while the tensor lives."""
    return map_leaves(obj, lambda x: isinstance(x, TensorBytes), _unpacked)


def _packed(tensor: torch.Tensor) -> TensorBytes:
    t = tensor.detach().cpu().contiguous()
    return TensorBytes(t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))


def _unpacked(packed: TensorBytes) -> torch.Tensor:
    dtype = getattr(torch, packed.dtype)
    if not packed.data.size:  # (no bytes to view as another dtype)
        return torch.empty(packed.shape, dtype=dtype)
    return torch.from_numpy(packed.data.copy()).view(dtype).reshape(packed.shape)
