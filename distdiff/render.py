"""Headless rendering of plans: imposing planned states on the simulator, and videos.

A MuJoCo locomotion observation (Walker2d-v5, Hopper, HalfCheetah with the default
``exclude_current_positions_from_observation``) is ``qpos[1:]`` followed by ``qvel``: everything
but the forward position x. :func:`impose_observation` rebuilds ``qpos = [x, obs[:nq-1]]``,
``qvel = obs[nq-1:]`` and sets it on the simulator, so a planned state can be rendered; the x of
a planned state sequence is integrated from its forward velocity ``qvel[0]`` with the env's
control step ``dt`` (:func:`integrate_x`).

Rendering needs an OpenGL backend without a display: ``MUJOCO_GL=egl`` (Debian packages
``libegl1 libgl1 libopengl0 libgl1-mesa-dri``: Mesa's software EGL) or ``MUJOCO_GL=osmesa``
(``libosmesa6``). :func:`configure_gl` picks one when the user did not, and must run before
MuJoCo creates its first GL context (PyOpenGL fixes its platform on first import).
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from distdiff.files import replacing

GL_PACKAGES = "libegl1 libgl1 libopengl0 libgl1-mesa-dri"


def configure_gl() -> str:
    """Choose the headless GL backend unless ``MUJOCO_GL`` is already set; returns it ("" if none).

    EGL when ``libEGL`` is installed, else OSMesa when ``libOSMesa`` is; with neither, nothing is
    set (``import mujoco`` with a backend whose library is missing fails outright; this way only
    rendering fails, and :func:`gl_problem` says what to install). ``PYOPENGL_PLATFORM`` follows
    ``MUJOCO_GL`` unless set. Call it before anything imports mujoco.
    """
    backend = os.environ.get("MUJOCO_GL")
    if not backend and sys.platform != "linux":
        # macOS has neither EGL nor OSMesa: Gymnasium's renderer takes GLFW, which needs a
        # desktop session (not SSH).
        return ""
    if not backend:
        if ctypes.util.find_library("EGL"):
            backend = "egl"
        elif ctypes.util.find_library("OSMesa"):
            backend = "osmesa"
        else:
            return ""
        os.environ["MUJOCO_GL"] = backend
    if backend in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def make_render_env(env_id: str, width: int, height: int):
    """An ``rgb_array`` env, already reset (gymnasium refuses to render before a reset)."""
    import gymnasium as gym

    env = gym.make(env_id, render_mode="rgb_array", width=width, height=height)
    env.reset(seed=0)
    return env


def gl_problem(env_id: str = "Walker2d-v5", width: int = 32, height: int = 32) -> Optional[str]:
    """None when a frame can be rendered here, else why not (with the packages to install)."""
    configure_gl()
    try:
        env = make_render_env(env_id, width, height)
        try:
            frame = env.render()
        finally:
            env.close()
    except Exception as e:  # GL stacks fail in many ways (ImportError, RuntimeError, GLError, AttributeError)
        fix = {"linux": f"on Debian/Ubuntu install {GL_PACKAGES} (EGL) or libosmesa6 (MUJOCO_GL=osmesa)",
               "darwin": "on macOS, rendering needs a desktop session (GLFW), not SSH"}.get(
                   sys.platform, "set MUJOCO_GL to a backend this system has")
        return f"cannot render with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({type(e).__name__}: {e}); {fix}"
    if frame is None or np.asarray(frame).ndim != 3:
        return f"the renderer returned no image (MUJOCO_GL={os.environ.get('MUJOCO_GL')})"
    return None


def impose_observation(env, obs: np.ndarray, x: float = 0.0) -> None:
    """Set the simulator to the state an observation describes, at forward position ``x``."""
    # (Here: distdiff.rollout imports torch and Gymnasium, and this module must stay light for
    # configure_gl, which runs before them.)
    from distdiff.rollout import physics_state_from_observation

    qpos, qvel = physics_state_from_observation(env, obs)
    qpos[0] = x
    env.unwrapped.set_state(qpos, qvel)


def integrate_x(states: np.ndarray, dt: float, x0: float = 0.0, npos: int = 8) -> np.ndarray:
    """Forward positions of a state sequence: ``x_{j+1} = x_j + qvel_j[0]·dt`` (explicit Euler)."""
    v = np.asarray(states, dtype=np.float64)[:, npos]
    return x0 + np.concatenate([[0.0], np.cumsum(v[:-1] * dt)])


def render_states(env, states: np.ndarray, x0: float = 0.0) -> list:
    """One frame per state, each imposed on the simulator (x integrated from the velocities)."""
    # (The forward velocity qvel[0] follows the nq - 1 observed positions; impose_observation
    # refuses observations of another layout.)
    xs = integrate_x(states, env.unwrapped.dt, x0, env.unwrapped.model.nq - 1)
    frames = []
    for s, x in zip(states, xs):
        impose_observation(env, s, x)
        frames.append(np.asarray(env.render()).copy())
    return frames


def render_rollout(env, qpos, qvel, actions: np.ndarray) -> Tuple[list, np.ndarray, Optional[int]]:
    """Execute ``actions`` from (qpos, qvel), rendering the start and every step: len+1 frames,
    past a termination too, as :func:`distdiff.rollout.replay_actions` replays them for the
    alignment error. Returns (frames, observations [len+1, obs_dim], the step at which the env
    terminated or None)."""
    u = env.unwrapped
    u.set_state(np.asarray(qpos, np.float64), np.asarray(qvel, np.float64))
    low, high = u.action_space.low, u.action_space.high
    frames = [np.asarray(env.render()).copy()]
    obs = np.empty((len(actions) + 1, u.observation_space.shape[0]))
    obs[0] = u._get_obs()
    ended = None
    for j, a in enumerate(actions):
        o, _, terminated, _, _ = u.step(np.clip(a, low, high))
        obs[j + 1] = o
        frames.append(np.asarray(env.render()).copy())
        if terminated and ended is None:
            ended = j + 1
    return frames, obs, ended


def label(frame: np.ndarray, text: str) -> np.ndarray:
    """``frame`` with ``text`` written in its top-left corner (white on a dark box)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(frame))
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((4, 3), text)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255))
    return np.asarray(img)


def plan_vs_real_frames(env, plan_states: np.ndarray, plan_actions: np.ndarray, qpos, qvel) -> np.ndarray:
    """Frames ``[H+1, height, 2·width, 3]``: left the plan's states imposed on the simulator,
    right the real execution of the plan's H actions from the same start (qpos, qvel).

    Frame k shows the state after k actions: the plan's s_k (its last state s_{H-1} is held in
    frame H, the plan has no s_H) beside the real state reached after k actions.
    """
    h = len(plan_states)
    planned = render_states(env, plan_states, x0=float(np.asarray(qpos)[0]))
    real, _, ended = render_rollout(env, qpos, qvel, plan_actions)
    frames = []
    for k in range(h + 1):
        left = label(planned[min(k, h - 1)], f"plan t={k}" if k < h else f"plan t={h - 1} (end)")
        right = label(real[k], f"real t={k}" if ended is None or k < ended else f"real t={k} (fell at {ended})")
        frames.append(np.concatenate([left, right], axis=1))
    return np.stack(frames)


def ffmpeg_available() -> bool:
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except (ImportError, RuntimeError, OSError):  # not installed, or no binary for this platform
        return False


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float, fmt: str = "auto") -> Path:
    """Write frames as MP4 (H.264, needs imageio-ffmpeg) or GIF; ``fmt`` auto = MP4 when ffmpeg
    is available, else GIF. ``path``'s suffix is replaced by the format's. Returns the file."""
    import imageio.v2 as iio2
    import imageio.v3 as iio

    frames = np.asarray(frames, dtype=np.uint8)
    path = Path(path)
    if fmt == "auto":
        fmt = "mp4" if ffmpeg_available() else "gif"
    if fmt not in ("mp4", "gif"):
        raise ValueError(f"unknown video format {fmt!r} (mp4, gif or auto)")
    out = path.with_suffix(f".{fmt}")
    # An interrupted rerun leaves the old video, not a truncated one.
    with replacing(out) as partial:
        if fmt == "mp4":
            # macro_block_size=1: never rescale frames (yuv420p only needs even sizes)
            writer = iio2.get_writer(partial, fps=fps, codec="libx264", quality=8, pixelformat="yuv420p",
                                     macro_block_size=1)
            try:
                for f in frames:
                    writer.append_data(f)
            finally:
                writer.close()
        else:
            iio.imwrite(partial, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    return out


def add_video(writer, tag: str, frames: np.ndarray, fps: float, step: int = 0) -> None:
    """What ``SummaryWriter.add_video`` writes (an animated-GIF image summary), encoded with
    imageio/Pillow instead of moviepy, which torch's add_video needs and which is not installed."""
    import imageio.v3 as iio
    from torch.utils.tensorboard.summary import Summary

    frames = np.asarray(frames, dtype=np.uint8)
    gif = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000.0 / fps, loop=0)
    _, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
