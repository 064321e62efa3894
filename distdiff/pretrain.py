"""Offline pretraining of denoiser, value net and (with ``train.train_dynamics``) dynamics model on a
Minari dataset (Alg. 1.1 and the value)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from distdiff import config as config_lib
from distdiff.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_cpu
from distdiff.process import deferred_interrupt, progress_bar
from distdiff.config import Config, reference_returns
from distdiff.data.minari_io import DatasetMissing, LoadedDataset, have_or_collect, load_or_collect
from distdiff.data.windows import WindowDataset, fit_normalizer
from distdiff.events import CONFIG_TEXT, RecentRate, drop_redone, flushed_sizes, kept_before
from distdiff.models import layout_of
from distdiff.normalizer import Normalizer
from distdiff.rundir import CHECKPOINT, CONFIG, check_new_run, clear_run
from distdiff.training import Trainer, check_env, resolve_device, seed_everything, torch_threads, value_target_of

# Non-finite updates in a row that stop pretraining: by then the weights or the data are broken.
MAX_SKIPPED_IN_A_ROW = 100


def _source(cfg: Config, own: Optional[str], log) -> Dict[str, object]:
    """Where :func:`have_or_collect` finds the config's dataset (``own``: see :func:`load_data`)."""
    d = cfg.data
    return dict(dataset_id=d.dataset_id if own is None else own, download=d.download,
                fallback_id=d.fallback_dataset_id if own is None or own == d.fallback_dataset_id else "",
                fallback_episodes=d.fallback_episodes, env_id=cfg.env.id, max_episode_steps=cfg.env.max_episode_steps,
                seed=cfg.train.seed, log=log)


def load_data(cfg: Config, *, own: Optional[str] = None, log=print) -> LoadedDataset:
    """The config's dataset (or its fallback, collected if missing). ``own``: the dataset that the
    checkpoint of a run being resumed trained on, which the run goes on with, whatever the config
    names. No fallback stands in for it (random-policy episodes for the rest of its training)
    unless it was the fallback, collected again where it is missing."""
    d = cfg.data
    if own is not None and own != d.dataset_id:
        log(f"resuming on the run's own dataset {own!r}, not on {d.dataset_id!r}, which the config names")
    try:
        data = load_or_collect(**_source(cfg, own, log), obs_dim=cfg.env.obs_dim, act_dim=cfg.env.act_dim)
    except DatasetMissing as e:
        if own is None or not d.fallback_dataset_id:
            raise
        raise DatasetMissing(f"{e}\nA resume trains on the run's own dataset: {d.fallback_dataset_id!r} "
                             f"(data.fallback_dataset_id) does not stand in for it") from e
    # (Not on a resume: references given then would put the run's scores on two scales.)
    note = references_note(cfg, data) if own is None else ""
    if note:
        log(note)
    return data


def references_note(cfg: Config, data: LoadedDataset) -> str:
    """Where ``cfg`` has no reference returns to score against and ``data``'s metadata records
    usable ones (Minari's ``ref_min_score``, ``ref_max_score``), how to score against them ("" else).
    Said, not taken: the config says what a run is (its config.yaml, which a resume compares
    with the command line's), its scoring included."""
    if reference_returns(cfg)[0] is not None or data.ref_min_score is None or data.ref_max_score is None:
        return ""
    low, high = float(data.ref_min_score), float(data.ref_max_score)
    if not config_lib.usable_references((low, high)):  # (what the flag would be refused for)
        return ""
    return (f"note: D4RL has no reference returns for {cfg.env.id}, so no normalized score is reported; dataset "
            f"{data.dataset_id!r} records ref_min_score {low!r} and ref_max_score {high!r}: pass "
            f"--eval.reference_returns={low!r},{high!r} (in a sweep file, under `fixed`: eval.reference_returns: "
            f"[{low!r}, {high!r}]) to score against them")


def dataset_to_train_on(cfg: Config, log=print) -> str:
    """The id of the dataset :func:`load_data` would load (had now: downloaded, or the fallback
    collected), without reading its episodes."""
    return have_or_collect(**_source(cfg, None, log))


def trained_on(cfg: Config, data: LoadedDataset) -> Config:
    """``cfg`` naming the dataset that ``data`` came from: the fallback, where it stood in for
    ``data.dataset_id``. The run's config.yaml then says what it was trained on, and a resume or
    phase 2 trains on the same data even where the configured one has become downloadable."""
    if data.dataset_id == cfg.data.dataset_id:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset_id=data.dataset_id))


def load_windows(cfg: Config, normalizer: Optional[Normalizer] = None, data: Optional[LoadedDataset] = None, *,
                 own: Optional[str] = None):
    """The config's dataset (``data`` if already loaded; see :func:`load_data` for ``own``) as
    training windows; fits the normalizer unless one is given."""
    data = data or load_data(cfg, own=own)
    layout = layout_of(cfg)
    normalizer = normalizer or fit_normalizer(data.episodes, layout, cfg.data.normalizer)
    windows = WindowDataset(data.episodes, layout=layout, horizon=cfg.model.horizon, normalizer=normalizer,
                            discount=cfg.data.discount, termination_penalty=cfg.data.termination_penalty,
                            value_target=cfg.data.value_target, start_weight=cfg.data.start_window_weight)
    return data, windows


def checkpoint_payload(trainer: Trainer, rng: np.random.Generator) -> dict:
    return to_cpu({**trainer.state_dict(), "data_rng": rng.bit_generator.state})


def pretrain(cfg: Config, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
             data: Optional[LoadedDataset] = None, init: Optional[str | Path] = None, overwrite: bool = False) -> Path:
    """Train until ``cfg.train.steps`` gradient steps; returns the checkpoint path.

    ``init``: start from that checkpoint's weights, normalizer and value statistics instead of
    fresh ones (see :meth:`Trainer.init_weights_from`), e.g. to add a return condition to a
    trained prior. ``overwrite``: clear the run in ``run_dir`` once the inputs have loaded (a
    ``run_dir`` that holds a run needs ``resume`` or ``overwrite``).

    Checkpoints every ``train.checkpoint_every`` steps, at the end, and on Ctrl-C, so an
    interrupted run loses at most one interval and ``resume=True`` continues its step count.
    """
    config_lib.validate(cfg)  # (a config made in code, e.g. by dataclasses.replace, was never checked)
    problems = config_lib.nonfinite_problems(cfg)
    if problems:
        raise config_lib.ConfigError("invalid config:\n  " + "\n  ".join(problems))
    check_new_run(run_dir, resume=resume, overwrite=overwrite)
    with torch_threads(cfg.train.num_threads):
        return _pretrain(cfg, Path(run_dir), resume=resume, quiet=quiet, data=data, init=init, overwrite=overwrite)


def check_continues(state: Dict[str, object], run_dir: Path) -> None:
    """Refuse to resume pretraining in ``run_dir`` from its checkpoint ``state`` when that is a
    launch/train.py run's: its pretraining would write over phase 2's checkpoint (learner,
    counters, prior)."""
    if "run" in state:
        raise CheckpointError(f"{run_dir} holds a launch/train.py run, which pretraining does not continue: resume it "
                              f"with launch/train.py --resume {run_dir}")


def is_done(state: Dict[str, object], cfg: Config) -> bool:
    """Whether the pretraining checkpointed in ``state`` has done ``cfg``'s ``train.steps``."""
    return int(state["step"]) >= cfg.train.steps


def _pretrain(cfg: Config, run_dir: Path, *, resume: bool, quiet: bool, data: Optional[LoadedDataset],
              init: Optional[str | Path], overwrite: bool) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    ckpt_path = run_dir / CHECKPOINT
    device = resolve_device(cfg.train.device)
    if resume and init is not None:
        raise ValueError("resume continues this run's own checkpoint; it cannot also start from init")
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        check_continues(state, run_dir)
        if is_done(state, cfg):
            # Nothing to train, so nothing is written: the config of this call would otherwise
            # become the run's without training a step (and a later --autoresume with the
            # run's own command line would be refused for it).
            return ckpt_path
    start = load_checkpoint(init) if init is not None else None
    if start is not None:
        check_env(start, cfg)
    seed_everything(cfg.train.seed)
    source = state or start
    normalizer = Normalizer.from_state_dict(source["normalizer"]) if source else None
    data, windows = load_windows(cfg, normalizer, data, own=state["config"]["data"]["dataset_id"] if state else None)
    cfg = trained_on(cfg, data)
    if state:
        trainer = Trainer.from_checkpoint(state, cfg=cfg, device=device)
    else:
        stats = {"mean": float(windows.returns.mean()), "std": float(windows.returns.std())}
        # A prior whose value net predicted something else keeps its weights as a start, but
        # its target statistics would standardize the new targets wrongly.
        if start and value_target_of(config_lib.from_dict(start["config"])) == value_target_of(cfg):
            stats = start["value_stats"]
        trainer = Trainer(cfg, windows.normalizer, value_mean=stats["mean"], value_std=stats["std"], device=device,
                          return_quantiles=windows.return_quantiles())
        if start:
            trainer.init_weights_from(start)
    rng = np.random.default_rng(cfg.train.seed)
    if state and "data_rng" in state:
        rng.bit_generator.state = state["data_rng"]

    # Only now: a start that fails (no dataset, a checkpoint that does not fit) leaves no run dir,
    # or the run it was to overwrite.
    if overwrite:
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, run_dir / CONFIG)
    # What a crashed run logged past its checkpoint is logged again from it.
    drop_redone(run_dir, kept_before(lambda tag: trainer.step), unchanged=state.get("events") if state else None)
    writer = SummaryWriter(str(run_dir))
    # At the step it starts (or resumes) from: a resume may override fields.
    writer.add_text(CONFIG_TEXT, config_lib.to_markdown(cfg), trainer.step)

    def save() -> None:
        # The events first: a checkpoint on disk has all it counts logged there too.
        save_checkpoint(ckpt_path, {**checkpoint_payload(trainer, rng), "events": flushed_sizes(writer)})

    bar = progress_bar(total=cfg.train.steps, initial=trainer.step, desc="pretrain", disable=quiet)
    update_rate = RecentRate(time.perf_counter(), trainer.step)  # over the last minute, as phase 2's
    # Losses are logged as means over the updates since the last point (as phase 2 logs each
    # learner call's): one update's batch in a hundred would be noise, its spikes read as instability.
    sums: Dict[str, float] = {}
    summed = 0
    saved_at = None

    def log_point() -> None:
        nonlocal sums, summed
        losses = {k: v / summed for k, v in sums.items()}
        sums, summed = {}, 0
        for k, v in losses.items():
            writer.add_scalar(k, v, trainer.step)
        writer.add_scalar("perf/updates_per_s", update_rate(time.perf_counter(), trainer.step), trainer.step)
        writer.add_scalar("charts/learning_rate", trainer.opt_denoiser.param_groups[0]["lr"], trainer.step)
        writer.add_scalar("faults/skipped_updates", trainer.skipped_updates, trainer.step)
        trained = {"denoiser": True, "value": cfg.train.train_value, "dynamics": cfg.train.train_dynamics}
        bar.set_postfix({net: f"{losses[f'losses/{net}']:.4f}" for net, on in trained.items() if on})

    try:
        with deferred_interrupt() as interrupted:
            while trainer.step < cfg.train.steps:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                # Whole: a second Ctrl-C inside an update (its nets stepped one by one, then the
                # step count and the EMA) would have the save below write it half done, and one
                # inside TensorBoard's writer can hang its close.
                with interrupted.hold():
                    trainer.follow_lr_schedule()
                    losses = trainer.checked_update(windows.sample(cfg.train.batch_size, rng), MAX_SKIPPED_IN_A_ROW)
                    if losses is None:
                        continue
                    bar.update(1)
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v
                    summed += 1
                    if trainer.step % cfg.train.log_every == 0:
                        log_point()
                    if trainer.step % cfg.train.checkpoint_every == 0:
                        save()
                        saved_at = trainer.step
            if summed:  # the updates since the last point
                log_point()
            if saved_at != trainer.step:
                save()
            # A stop that came with the last steps or the save: pretraining is done and saved, and
            # the caller (train.py's phase 2) must not start anything more.
            stopped = interrupted.is_set()
    except KeyboardInterrupt:
        # Saved with Ctrl-C (and SIGTERM) deferred again, as phase 2 saves: one that came
        # meanwhile would raise inside the write and lose the steps since the last checkpoint.
        with deferred_interrupt():
            if summed:
                log_point()
            save()
        raise
    finally:
        # On a failure too (a divergence): the points just before it are what tell it, and
        # TensorBoard's writer thread would drop what it holds at exit.
        with deferred_interrupt():
            bar.close()
            writer.close()
    if stopped:
        raise KeyboardInterrupt
    return ckpt_path
