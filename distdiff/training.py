"""The learner's math: denoiser, value and dynamics updates, EMA, checkpoints. No I/O loops here."""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import random
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from distdiff.checkpoint import CheckpointError, load_checkpoint
from distdiff.config import Config, ConfigError, from_dict, net_fields, value_of
from distdiff.data.minari_io import env_family
from distdiff.data.windows import Batch
from distdiff.diffusion.gaussian import Guide
from distdiff.models import NETS, build_models
from distdiff.nn.dynamics import transition_loss
from distdiff.normalizer import Normalizer
from distdiff.planner import Planner

LR_SCHEDULES = ("constant", "cosine")


def lr_multiplier(step: int, *, schedule: str, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Fraction of the peak learning rate for gradient step ``step`` (0-based) of ``total``.

    ``cosine``: linear warm-up over ``warmup`` steps, then half a cosine down to ``min_ratio``
    at ``total`` (Loshchilov & Hutter 2017, "SGDR", without restarts); past ``total`` it stays
    there.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {list(LR_SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block, then back to what they were: a
    library caller's own torch code after a pretraining or a run keeps its thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str, *, field: str = "train.device", instead: str = "--train.device cpu") -> torch.device:
    """``name`` as a torch device (auto: cuda when present); ``field`` and ``instead`` say in
    the error which setting asked for a missing GPU, and what to pass instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"{field} is cuda but torch {torch.__version__} ({build}) sees no CUDA device: pass "
                          f"{instead}, or install torch's CUDA build (README, Installing)")
    return torch.device(name)


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target ← decay·target + (1−decay)·source; decay 0 copies. Multi-tensor ops, as
    torch.optim.swa_utils does: one kernel per group instead of one per tensor, which is what
    bounds a small GPU learner (and a state-dict load per step cost 11 ms on one CPU core)."""
    params = list(target.parameters())
    if params:
        torch._foreach_lerp_(params, list(source.parameters()), 1.0 - decay)
    buffers = list(target.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(source.buffers()))


def flat_weights(module: torch.nn.Module) -> np.ndarray:
    """All state-dict tensors of ``module`` as one float32 array (in state-dict order).

    One contiguous NumPy array travels through Ray's object store zero-copy: a reader maps it
    instead of unpickling one tensor at a time, which makes a broadcast cost a memcpy per actor.
    Joined where the nets are, then copied once: a GPU learner's state holds hundreds of tensors,
    and a copy of each to the host would wait for the GPU each time.
    """
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in module.state_dict().values()])
    return flat.to("cpu").numpy()


@torch.no_grad()
def load_flat_weights(module: torch.nn.Module, flat: np.ndarray) -> None:
    state = module.state_dict()
    total = sum(t.numel() for t in state.values())
    if flat.shape != (total,):
        raise ValueError(f"flat weights have {flat.shape} entries, the module needs ({total},)")
    flat = np.asarray(flat, dtype=np.float32)
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only views of shared memory. Wrapping one and
        # only reading from it saves making a writable copy of every version first (a fresh
        # 6 MB allocation with its page faults): a quarter of what a new version costs an actor.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(flat)
    targets = list(state.values())
    pieces = source.split([t.numel() for t in targets])
    torch._foreach_copy_(targets, [p.view_as(t) for p, t in zip(pieces, targets)])


def load_weights(nets: Dict[str, torch.nn.Module], weights: Dict[str, np.ndarray]) -> None:
    """Load a published weights dict into the nets of the same names (``Models.nets``); the
    dynamics model is only in it when the run trains one."""
    for name, flat in weights.items():
        load_flat_weights(nets[name], flat)


def quantile_of(values: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Where ``values`` fall in a table of evenly spaced quantiles (``quantiles[i]`` is the
    i/(n−1) quantile), linearly interpolated and clamped to [0, 1]. A value equal to a run of
    tied entries (many windows that earn the same, e.g. nothing) gets the middle of the run, not
    its first entry."""
    n = quantiles.shape[0]

    def first_position(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The fractional index of ``v`` in ``table``, at the first entry of a tied run."""
        idx = torch.searchsorted(table, v.contiguous()).clamp(1, n - 1)
        lo, hi = table[idx - 1], table[idx]
        frac = ((v - lo) / (hi - lo).clamp(min=1e-12)).clamp(0.0, 1.0)
        return (idx - 1).to(v.dtype) + frac

    # The last entry of a tied run is the first one of the table read backwards (negated).
    last = (n - 1) - first_position(-values, (-quantiles).flip(0))
    return (first_position(values, quantiles) + last) / (2 * (n - 1))


# What the value net predicts: its target statistics (value_stats) hold only for these.
VALUE_TARGET_FIELDS = ("data.value_target", "data.discount", "data.termination_penalty", "model.horizon")


def value_target_of(cfg: Config) -> tuple:
    """What the value net of a config predicts: its target statistics hold only for that."""
    return tuple(value_of(cfg, name) for name in VALUE_TARGET_FIELDS)


def check_env(state: Dict[str, object], cfg: Config) -> None:
    """Training on from a checkpoint needs one made in the config's env (another version of it
    will do): nets of the same sizes (HalfCheetah and Walker2d both have 17 and 6 dims) would
    load, and plan with another env's normalizer and value statistics."""
    saved = from_dict(state["config"]).env.id
    if env_family(saved) != env_family(cfg.env.id):
        raise CheckpointError(f"this checkpoint was trained in {saved}, the config's env is {cfg.env.id}: its nets, "
                              f"normalizer and value statistics are that env's")


def check_value_target(state: Dict[str, object], cfg: Config) -> None:
    """Training on from a checkpoint needs the value target it standardized (``value_stats``)."""
    saved = value_target_of(from_dict(state["config"]))
    if saved != value_target_of(cfg):
        raise CheckpointError(
            f"this checkpoint's value net predicts {saved} (data.value_target, discount, termination_penalty, "
            f"model.horizon), the config asks for {value_target_of(cfg)}: retrain the value net first with "
            "launch/pretrain.py --init CHECKPOINT and the new data fields")


class NonFiniteError(FloatingPointError):
    """Updates kept turning non-finite: the weights or the data are broken."""


class Trainer:
    """Owns the denoiser, value net, dynamics model, their EMA copies and optimizers.

    ``value_mean``/``value_std`` standardize the value targets (``data.value_target``) so that one
    learning rate and one guidance scale fit any reward scale. ``return_quantiles`` (the
    offline windows' return quantiles, :meth:`WindowDataset.return_quantiles`) turns window
    returns into the condition of a return-conditioned denoiser; online windows go through
    the same table, so a quantile means the same plan quality for the whole run.
    """

    def __init__(self, cfg: Config, normalizer: Normalizer, *, value_mean: float, value_std: float, device="cpu",
                 lr_scale: float = 1.0, return_quantiles: Optional[np.ndarray] = None):
        self.cfg = cfg
        self.lr_scale = float(lr_scale)
        self.device = torch.device(device)
        self.normalizer = normalizer
        self.value_mean, self.value_std = float(value_mean), max(float(value_std), 1e-6)
        if cfg.model.returns_condition and return_quantiles is None:
            raise ValueError("model.returns_condition needs the offline data's window-return quantiles")
        self.return_quantiles = None
        if cfg.model.returns_condition:
            self.return_quantiles = torch.as_tensor(np.asarray(return_quantiles, dtype=np.float32), device=self.device)
        self.diffusion, self.denoiser, self.value, self.dynamics = (m.to(self.device) for m in build_models(cfg, normalizer))
        self.ema_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.ema_value = copy.deepcopy(self.value).requires_grad_(False)
        self.ema_dynamics = copy.deepcopy(self.dynamics).requires_grad_(False)
        # Fused Adam: one kernel for all parameters instead of several per tensor; 3x faster
        # steps on one CPU thread here, and on a GPU it removes most of the step's launches.
        self.opt_denoiser = torch.optim.Adam(self.denoiser.parameters(), fused=True)
        self.opt_value = torch.optim.Adam(self.value.parameters(), fused=True)
        self.opt_dynamics = torch.optim.Adam(self.dynamics.parameters(), fused=True)
        self._set_learning_rates()
        if cfg.train.compile != "none":
            # In place, after the EMA copies were made: state-dict keys stay as they are, and
            # the planning (EMA) nets stay eager.
            self.denoiser.compile(mode=cfg.train.compile)
            self.value.compile(mode=cfg.train.compile)
        self.step = 0
        self.skipped_updates = 0
        self.skipped_in_a_row = 0  # not checkpointed: a resume is not stopped by old ones
        self.nonfinite: List[str] = []  # what the last skipped update found non-finite

    def _set_learning_rates(self, multiplier: float = 1.0) -> None:
        tc = self.cfg.train
        for opt, lr in ((self.opt_denoiser, tc.lr), (self.opt_value, tc.value_lr), (self.opt_dynamics, tc.dynamics_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * self.lr_scale * multiplier

    def follow_lr_schedule(self) -> None:
        """Set the rates of the next step from ``train.lr_schedule`` over ``train.steps``
        (pretraining's budget; phase 2 never calls this and keeps its constant rate)."""
        tc = self.cfg.train
        self._set_learning_rates(lr_multiplier(self.step, schedule=tc.lr_schedule, total=tc.steps,
                                               warmup=tc.warmup_steps, min_ratio=tc.lr_min_ratio))

    def _clip(self, module) -> torch.Tensor:
        params = [p for p in module.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def checked_update(self, batch: Batch, max_in_a_row: int) -> Optional[Dict[str, float]]:
        """:meth:`update`, raising :class:`NonFiniteError` once ``max_in_a_row`` of them in a row
        were skipped. In a row, not in all: a rare bad batch over a long run (bf16) is skipped
        however often it comes."""
        losses = self.update(batch)
        if losses is not None:
            self.skipped_in_a_row = 0
            return losses
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= max_in_a_row:
            found = f" (in the last: {', '.join(self.nonfinite)})" if self.nonfinite else ""
            raise NonFiniteError(f"{self.skipped_in_a_row} non-finite updates in a row{found}; stopping with the last "
                                 f"good checkpoint intact")
        return None

    def update(self, batch: Batch) -> Optional[Dict[str, float]]:
        """One gradient step on every net. Returns the losses, or None when the step was
        skipped because a loss or gradient was not finite (nothing reaches the weights then)."""
        x, mask, cond, returns, window_returns = (v.to(self.device, non_blocking=True) for v in batch)
        self.denoiser.train()
        zero = torch.zeros((), device=self.device)
        denoiser = self.denoiser
        if self.return_quantiles is not None:
            keep = (torch.rand(x.shape[0], device=self.device) >= self.cfg.train.condition_dropout).float()
            denoiser = functools.partial(self.denoiser, returns=quantile_of(window_returns, self.return_quantiles),
                                         returns_mask=keep)
        with self._autocast():
            loss_d = self.diffusion.loss(denoiser, x, cond, mask=mask).float()
            loss_v = zero
            if self.cfg.train.train_value:
                t = torch.randint(0, self.diffusion.n_steps, (x.shape[0],), device=self.device)
                x_t = self.diffusion.layout.condition(self.diffusion.q_sample(x, t, torch.randn_like(x)), cond)
                target = (returns - self.value_mean) / self.value_std
                loss_v = torch.nn.functional.mse_loss(self.value(x_t, t).float(), target)
            loss_m = zero
            if self.cfg.train.train_dynamics:
                # On the clean windows: the planner ranks finished plans, it never asks the
                # model about noised ones.
                loss_m = transition_loss(self.dynamics, x, mask, self.diffusion.layout).float()
        optimizers = (self.opt_denoiser, self.opt_value, self.opt_dynamics)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        (loss_d + loss_v + loss_m).backward()
        grad_d = self._clip(self.denoiser)
        grad_v = self._clip(self.value) if self.cfg.train.train_value else zero
        grad_m = self._clip(self.dynamics) if self.cfg.train.train_dynamics else zero
        # One host sync per update, not one per check: a GPU learner of this size is bound by
        # kernel launches, and each float() of a CUDA tensor drains the launch queue. A
        # non-finite loss gives non-finite gradients, so this one check covers both.
        stats = torch.stack([loss_d.detach(), loss_v.detach(), loss_m.detach(), grad_d, grad_v, grad_m]).tolist()
        if not all(math.isfinite(v) for v in stats):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            # Named in the error that repeated skips raise: a value loss alone points at its
            # targets, every loss at once at the batch or the weights.
            self.nonfinite = [name for name, v in zip(("denoiser loss", "value loss", "dynamics loss",
                                                       "denoiser gradient", "value gradient", "dynamics gradient"),
                                                      stats) if not math.isfinite(v)]
            return None
        self.opt_denoiser.step()
        if self.cfg.train.train_value:
            self.opt_value.step()
        if self.cfg.train.train_dynamics:
            self.opt_dynamics.step()
        self.step += 1
        self._update_ema()
        # Only the nets trained: a net left alone logged at 0 would read as a perfect fit.
        out = {}
        trained = (True, self.cfg.train.train_value, self.cfg.train.train_dynamics)
        for name, on, loss, grad in zip(("denoiser", "value", "dynamics"), trained, stats[:3], stats[3:]):
            if on:
                out[f"losses/{name}"], out[f"losses/{name}_grad_norm"] = loss, grad
        return out

    def _update_ema(self) -> None:
        tc = self.cfg.train
        if self.step < tc.ema_start:
            decay = 0.0
        elif self.step % tc.ema_every == 0:
            decay = tc.ema_decay
        else:
            return
        for target, source in ((self.ema_denoiser, self.denoiser), (self.ema_value, self.value), (self.ema_dynamics, self.dynamics)):
            ema_update(target, source, decay)

    # ----- weights and planners ------------------------------------------------------------
    def weights(self) -> Dict[str, np.ndarray]:
        """The EMA weights, flat, on CPU: what rollout workers plan with (see :func:`flat_weights`).
        The value net and the dynamics model only when they train: otherwise no planner uses
        them (:meth:`Planner.from_config`), and every broadcast would carry them (the dynamics
        model's 0.6 MB) to every actor for nothing."""
        out = {"denoiser": flat_weights(self.ema_denoiser)}
        if self.cfg.train.train_value:
            out["value"] = flat_weights(self.ema_value)
        if self.cfg.train.train_dynamics:
            out["dynamics"] = flat_weights(self.ema_dynamics)
        return out

    def planner(self) -> Planner:
        return Planner.from_config(self.cfg, diffusion=self.diffusion, denoiser=self.ema_denoiser.eval(),
                                   value=self.ema_value.eval(), dynamics=self.ema_dynamics.eval(),
                                   normalizer=self.normalizer, device=self.device)

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "skipped_updates": self.skipped_updates,
            "normalizer": self.normalizer.state_dict(),
            "value_stats": {"mean": self.value_mean, "std": self.value_std},
            "return_quantiles": None if self.return_quantiles is None else self.return_quantiles.cpu().tolist(),
            "denoiser": self.denoiser.state_dict(),
            "value": self.value.state_dict(),
            "ema_denoiser": self.ema_denoiser.state_dict(),
            "ema_value": self.ema_value.state_dict(),
            "dynamics": self.dynamics.state_dict(),
            "ema_dynamics": self.ema_dynamics.state_dict(),
            "opt_denoiser": self.opt_denoiser.state_dict(),
            "opt_value": self.opt_value.state_dict(),
            "opt_dynamics": self.opt_dynamics.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # A GPU learner draws its noise and noise levels from the device's generator.
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        check_dynamics(state, self.cfg)
        with_dynamics = has_dynamics(state)
        try:
            self.denoiser.load_state_dict(state["denoiser"])
            self.value.load_state_dict(state["value"])
            self.ema_denoiser.load_state_dict(state["ema_denoiser"])
            self.ema_value.load_state_dict(state["ema_value"])
            self.opt_denoiser.load_state_dict(state["opt_denoiser"])
            self.opt_value.load_state_dict(state["opt_value"])
            if with_dynamics:
                self.dynamics.load_state_dict(state["dynamics"])
                self.ema_dynamics.load_state_dict(state["ema_dynamics"])
                self.opt_dynamics.load_state_dict(state["opt_dynamics"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise misfit(state, self.cfg, e) from e
        # An optimizer's state dict carries the learning rate it was saved with; the config is
        # what the user asked for now (fine-tuning from --init with a smaller rate, Tune sweeps).
        self._set_learning_rates()
        self.step = int(state["step"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    def init_weights_from(self, state: Dict[str, object]) -> None:
        """Start from a checkpoint's nets and their EMA copies, with fresh optimizers and step 0:
        fine-tuning a prior. A return-conditioned denoiser may start from an unconditioned one:
        its return embedding is then the zero-initialized one it was built with, so training
        begins at exactly the old planner."""
        # Nets of the same shapes would load under another noise schedule, and denoise wrong.
        differ = [d for d in _differences(state, self.cfg) if not d.startswith("model.returns_condition ")]
        if differ:
            raise _does_not_fit(differ)
        try:
            for name in ("denoiser", "ema_denoiser"):
                missing, unexpected = getattr(self, name).load_state_dict(state[name], strict=False)
                new = [k for k in missing if k.startswith("returns_mlp.")]
                if unexpected or len(new) != len(missing):
                    raise RuntimeError(f"missing keys {sorted(set(missing) - set(new))}, unexpected keys {sorted(unexpected)}")
            self.value.load_state_dict(state["value"])
            self.ema_value.load_state_dict(state["ema_value"])
            if "ema_dynamics" in state:
                self.dynamics.load_state_dict(state["dynamics"])
                self.ema_dynamics.load_state_dict(state["ema_dynamics"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise misfit(state, self.cfg, e) from e

    @classmethod
    def from_checkpoint(cls, state: Dict[str, object], *, cfg: Optional[Config] = None, device="cpu",
                        lr_scale: float = 1.0) -> "Trainer":
        cfg = cfg or from_dict(state["config"])
        stats = state["value_stats"]
        if cfg.model.returns_condition and state.get("return_quantiles") is None:
            raise CheckpointError("model.returns_condition needs a checkpoint pretrained with it (this one has no "
                                  "window-return quantiles)")
        check_made_with(state, cfg)
        trainer = cls(cfg, Normalizer.from_state_dict(state["normalizer"]), value_mean=stats["mean"],
                      value_std=stats["std"], device=device, lr_scale=lr_scale,
                      return_quantiles=state.get("return_quantiles"))
        trainer.load_state_dict(state)
        return trainer


def prior_of(state: Dict[str, object]) -> Dict[str, Dict[str, torch.Tensor]]:
    """The planning (EMA) nets phase 2 started from, by net name. A phase-2 checkpoint carries
    them as ``prior``; any other checkpoint is its own prior. Its dynamics model only where its
    run trained one: every checkpoint holds one, and an untrained one blended in
    (``online.prior_weight``) made the model that ranks plans 40× worse."""
    if "prior" in state:
        return state["prior"]
    trained = {name: True for name in NETS}
    trained["dynamics"] = bool(state.get("config", {}).get("train", {}).get("train_dynamics", False))
    return {name: state[f"ema_{name}"] for name in NETS if f"ema_{name}" in state and trained[name]}


def interpolate(aligned: Dict[str, torch.Tensor], prior: Dict[str, torch.Tensor], prior_weight: float) -> Dict[str, torch.Tensor]:
    """(1 − w)·aligned + w·prior, entry by entry, for two state dicts of one net: weight-space
    ensembling of a fine-tuned net with the net it was fine-tuned from (WiSE-FT, Wortsman et al.
    2022), which keeps what fine-tuning gained with less of what it broke. Non-float entries
    are the aligned net's."""
    return {k: torch.lerp(v, prior[k].to(v.dtype), prior_weight) if torch.is_floating_point(v) else v
            for k, v in aligned.items()}


def _differences(state: Dict[str, object], cfg: Config) -> List[str]:
    """The :func:`~distdiff.config.net_fields` whose values in ``cfg`` are not the checkpoint's."""
    saved = from_dict(state["config"])
    return [f"{name} is {value_of(saved, name)!r} there, {value_of(cfg, name)!r} here" for name in net_fields()
            if value_of(saved, name) != value_of(cfg, name)]


def misfit(state: Dict[str, object], cfg: Config, error: Exception) -> CheckpointError:
    """The error for a checkpoint whose nets do not load into the config's: the config fields
    that differ, rather than PyTorch's line for every tensor of another shape."""
    try:
        differ = _differences(state, cfg)
    except (KeyError, ConfigError):
        differ = []
    return _does_not_fit(differ or [str(error).strip().splitlines()[0]])


def _does_not_fit(details: List[str]) -> CheckpointError:
    return CheckpointError(f"checkpoint does not fit this model config: {'; '.join(details)}")


def check_made_with(state: Dict[str, object], cfg: Config) -> None:
    """Training on from a checkpoint or planning with it needs the config its nets were made
    with (:func:`~distdiff.config.net_fields`), its env and its value target."""
    check_env(state, cfg)
    differ = _differences(state, cfg)  # first: model.horizon is also part of the value target
    if differ:
        raise _does_not_fit(differ)
    check_value_target(state, cfg)


def planner_from_checkpoint(state: Dict[str, object] | str | Path, cfg: Optional[Config] = None,
                            device="cpu", guide: Optional[Guide] = None) -> Planner:
    """A planner with the checkpoint's EMA weights (no optimizers built), blended with the
    prior's by ``online.prior_weight``. ``state``: a checkpoint, loaded (:func:`load_checkpoint`)
    or its path (a run dir means its ``checkpoint.pt``); ``cfg``: how it acts, by default the
    config it was trained with (only fields that do not make its nets may differ); ``guide``: a
    guidance step of your own in place of the value guide (:class:`Planner`)."""
    if isinstance(state, (str, Path)):
        state = load_checkpoint(state)
    cfg = cfg or from_dict(state["config"])
    check_made_with(state, cfg)
    normalizer = Normalizer.from_state_dict(state["normalizer"])
    models = build_models(cfg, normalizer)
    check_dynamics(state, cfg)
    with_dynamics = has_dynamics(state)
    prior, w = prior_of(state), cfg.online.prior_weight
    try:
        for name, net in models.nets().items():
            if name == "dynamics" and not with_dynamics:
                continue
            weights = state[f"ema_{name}"]
            if w > 0 and name in prior:
                weights = interpolate(weights, prior[name], w)
            net.load_state_dict(weights)
    except (KeyError, RuntimeError) as e:
        raise misfit(state, cfg, e) from e
    return Planner.from_config(cfg, diffusion=models.diffusion.to(device), denoiser=models.denoiser.to(device).eval(),
                               value=models.value.to(device).eval(), dynamics=models.dynamics.to(device).eval(),
                               normalizer=normalizer, device=device, guide=guide)


def has_dynamics(state: Dict[str, object]) -> bool:
    """Whether a checkpoint holds a dynamics model. Those written before it existed do not: they
    still load, with a fresh one (:func:`check_dynamics` refuses to rank plans by it)."""
    return "ema_dynamics" in state


def check_dynamics(state: Dict[str, object], cfg: Config) -> None:
    """Refuse ``cfg`` ranking plans by a dynamics model that the checkpoint ``state`` did not train."""
    trained = has_dynamics(state) and bool(state.get("config", {}).get("train", {}).get("train_dynamics", False))
    if cfg.planner.dynamics_candidates > 1 and not trained:
        raise CheckpointError("planner.dynamics_candidates > 1 needs a checkpoint whose run trained the dynamics model "
                              "(train.train_dynamics true): pretrain with it, or plan with 1 candidate")
