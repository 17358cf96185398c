"""Interactive rollout: encode a context clip into the memory bank once, then generate one chunk at a time under
actions chosen as you go (the notebook's buttons, `python -m decmem_jax.play`'s keyboard).

    model = WorldModel(load_config("configs/world_tiny.py:decmem"), steps=4, guidance=1.0)
    session = model.session(frames, actions, poses, world=world)   # context: uint8 [T, H, W, 3], T = 1 + 4k
    result = session.step(next_actions)      # int32 [4 * chunk, 8] -> ChunkResult(frames uint8 [16, H, W, 3], ...)
    for piece in session.stream(next_actions): ...   # the same, 4 frames at a time as the VAE decodes them

`WorldModel` holds what is expensive and shared (weights, the jitted chunk step), so a new `Session` (a page reload
in play) costs one prefill, not a recompilation. A session takes the steps of `rollout.generate` (the procedure
`python -m decmem_jax.rollout` runs) one chunk at a time: the same encoder, prefill, conditioning slices, chunk noise
and segment call (a `generate.Rollout` driven with one-chunk `lax.scan`s); what differs is only that the next
chunk's actions are not known in advance, and that the VAE decodes one latent at a time so frames can be shown
while the rest of the chunk is still decoding.

Poses: the model is conditioned on the camera pose of every frame, which a person pressing keys does not supply.
With the procedural `world` of the context clip the session walks the agent through that world (collisions, steps
up), the same poses the generator would have rendered; without one, `free_poses` integrates the actions in empty
space (no collisions, constant height).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from decmem_jax.cli import configs_importable
from decmem_jax.data import agent as agent_lib
from decmem_jax.errors import DecMemError
from decmem_jax.format import (ACTION_DIM, ACTION_NVEC, FRAMES_PER_LATENT, POSE_DIM, is_frame_count,
                               last_frame_of_latent, latent_size, latents_for_frames)

ROOT = Path(__file__).resolve().parents[2]  # the repository root (configs/, weights/)


class SessionError(DecMemError, ValueError):
    """A bad config, input or call; the message names the file or field."""


class SessionFull(SessionError):
    """The memory bank (the KV cache, fixed capacity) has no room for another chunk."""


def load_config(spec: str):
    """A run config from 'path/to/config.py[:arg]' (as `--config=` takes it), e.g. 'configs/world_tiny.py:decmem'.
    A relative path that does not exist here is looked up in the repository root (a notebook in notebooks/)."""
    path, _, arg = str(spec).partition(":")
    file = Path(path)
    if not file.is_file() and not file.is_absolute() and (ROOT / file).is_file():
        file = ROOT / file
    if not file.is_file():
        raise SessionError(f"config {path}: file not found")
    module_spec = importlib.util.spec_from_file_location(f"_decmem_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    with configs_importable(file):  # as the CLIs load it (decmem_jax.cli.define_config_flag)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()


def resolve_weights(c) -> None:
    """Makes config.checkpoint / config.vae_checkpoint usable from any working directory (relative paths are tried
    here, then in the repository root) and raises SessionError naming the field when one does not exist."""
    if c.random_weights:
        return
    for field in ("checkpoint", "vae_checkpoint"):
        value = c[field]
        if not value:
            raise SessionError(f"config.{field} is empty: pass --config.{field}=DIR")
        path = Path(value).expanduser()
        if not path.exists() and not path.is_absolute() and (ROOT / path).exists():
            path = ROOT / path
        if not path.exists():
            raise SessionError(f"config.{field} {value}: no such folder (relative paths are read from the "
                               f"working directory {os.getcwd()} or the repository root {ROOT})")
        with c.unlocked():
            c[field] = str(path)


@dataclasses.dataclass
class ChunkResult:
    """One generated chunk."""

    frames: np.ndarray  # uint8 [4 * chunk, H, W, 3]
    actions: np.ndarray  # int32 [4 * chunk, 8], as given
    poses: np.ndarray  # float32 [4 * chunk, 5], raw world poses (x, y, z, pitch, yaw) the model was conditioned on
    retrieval: np.ndarray | None  # float32 [history latents]: share of the chunk's SGM picks per latent frame
    index: int  # chunk number in this session (0 = the first generated chunk)
    first_frame: int  # index of frames[0] in the session's video (the context frames come first)
    seconds: float  # wall time of the chunk: conditioning, denoising, commit and decode

    @property
    def fps(self) -> float:
        """Generated frames per second of wall time."""
        return len(self.frames) / self.seconds


def free_poses(pose, actions) -> np.ndarray:
    """float32 [N, 5]: the pose after each action row, in empty space (no collisions, height unchanged): pitch and
    yaw turn by 15 degrees per camera bin, forward/back/strafe move `agent.STEP` blocks along the heading."""
    x, y, z, pitch, yaw = (float(v) for v in pose)
    out = []
    for a in np.asarray(actions):
        pitch = min(90.0, max(-90.0, pitch + float((a[3] - 12) * 15)))
        yaw = agent_lib.wrap_yaw(yaw + float((a[4] - 12) * 15))
        fb = {1: 1.0, 2: -1.0}.get(int(a[0]), 0.0)
        lr = {1: 1.0, 2: -1.0}.get(int(a[1]), 0.0)
        if fb or lr:
            hx, hz = agent_lib.heading(yaw)
            scale = agent_lib.STEP / float(np.hypot(fb, lr))
            x += scale * (fb * hx + lr * hz)  # left of the heading (hx, hz) is (hz, -hx), as agent.step_pose
            z += scale * (fb * hz - lr * hx)
        out.append((x, y, z, pitch, yaw))
    return np.asarray(out, np.float32).reshape(-1, POSE_DIM)


def check_actions(actions, frames: int, what: str = "actions") -> np.ndarray:
    """int32 [frames, 8] MineDojo action rows, or SessionError saying what is wrong."""
    a = np.asarray(actions)
    if a.shape != (frames, ACTION_DIM) or not np.issubdtype(a.dtype, np.integer):
        raise SessionError(f"{what}: expected integer rows [{frames}, {ACTION_DIM}] (one chunk of frames), got "
                           f"{a.dtype} {a.shape}")
    bad = [i for i, n in enumerate(ACTION_NVEC) if a[:, i].min() < 0 or a[:, i].max() >= n]
    if bad:
        raise SessionError(f"{what}: values out of range in column(s) {bad} (ranges {ACTION_NVEC})")
    return a.astype(np.int32)


class WorldModel:
    """The DiT and VAE of a run config, with the jitted pieces a session needs (compiled once, on first use)."""

    def __init__(self, c, *, steps: int | None = None, guidance: float | None = None, seed: int = 0):
        from decmem_jax.rollout import settings as settings_lib
        from decmem_jax.rollout.load import RolloutError, build_models

        c = c.copy_and_resolve_references()  # the caller's config stays as it was
        with c.unlocked():
            if steps is not None:
                c.rollout.steps = int(steps)
            if guidance is not None:
                c.rollout.guidance = float(guidance)
        problems = settings_lib.check(c)
        if problems:
            raise SessionError("bad config: " + "; ".join(problems))
        resolve_weights(c)
        self.config, self.seed = c, int(seed)
        try:
            self.settings = settings_lib.sampler_settings(c)
            self.dit, self.vae, self.weights = build_models(c)
        except (RolloutError, OSError, ValueError) as e:
            raise SessionError(str(e)) from e
        r = c.rollout
        self.chunk, self.fps = int(r.chunk), int(r.fps)
        self.frames_per_chunk = FRAMES_PER_LATENT * self.chunk
        self.size = (int(r.height), int(r.width))
        self.latent_hw = latent_size(self.size)
        self.memory = self.dit.cfg.memory
        self._segment = None
        self._embed = None

    @property
    def conditioned(self) -> bool:
        return self.dit.cfg.conditioning is not None

    @property
    def pose_conditioned(self) -> bool:
        cond = self.dit.cfg.conditioning
        return cond is not None and cond.pose == "added"

    def segment_fn(self):
        from decmem_jax.rollout import engine

        if self._segment is None:  # one jitted function for every session: compiled once per process
            self._segment = engine.make_segment_fn(self.settings, with_selection=self.memory is not None)
        return self._segment

    def embed_fn(self):
        from flax import nnx

        if self._embed is None:  # jitted: eagerly the conditioning MLPs cost ~30 small dispatches per chunk
            self._embed = nnx.jit(lambda dit, a, p, first: dit.embed_conditioning(a, p, first_latent=first),
                                  static_argnums=(3,))
        return self._embed

    def session(self, frames, actions, poses, *, world=None, max_chunks: int = 64, text=None) -> "Session":
        return Session(self, frames, actions, poses, world=world, max_chunks=max_chunks, text=text)

    def describe(self) -> dict:
        s = self.settings
        return dict(weights=self.weights, steps=s.steps, solver=s.solver, guidance=s.guidance,
                    cfg=s.uses_cfg(self.conditioned), chunk_frames=self.frames_per_chunk, size=list(self.size),
                    fps=self.fps, memory=self.memory is not None)


class Session:
    """One rollout: a memory bank seeded by a context clip, extended one chunk per `step`. Not thread-safe: one
    caller at a time (play runs every step of a page in one worker thread)."""

    def __init__(self, model: WorldModel, frames, actions, poses, *, world=None, max_chunks: int = 64, text=None):
        import jax
        import jax.numpy as jnp

        from decmem_jax.data.pipeline import clip_conditioning
        from decmem_jax.models.conditioning import fixed_text_context
        from decmem_jax.rollout import engine
        from decmem_jax.rollout import generate as generate_lib

        frames = np.asarray(frames)
        t = frames.shape[0] if frames.ndim == 4 else 0
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (*model.size, 3):
            raise SessionError(f"context frames: expected uint8 [T, {model.size[0]}, {model.size[1]}, 3] (the "
                               f"config's rollout.height/width), got {frames.dtype} {frames.shape}")
        if not is_frame_count(t):
            raise SessionError(f"context frames: {t} frames; the VAE needs T = 1 + 4k")
        actions = check_actions(actions, t, "context actions")
        poses = np.asarray(poses, np.float32)
        if poses.shape != (t, POSE_DIM) or not np.isfinite(poses).all():
            raise SessionError(f"context poses: expected finite float [{t}, {POSE_DIM}], got {poses.shape}")
        if max_chunks < 1:
            raise SessionError(f"max_chunks={max_chunks} must be >= 1")
        self.model, self.world = model, world
        self.context_frames = t
        self.context_latents = latents_for_frames(t)
        self.capacity = self.context_latents + max_chunks * model.chunk
        self.max_chunks = int(max_chunks)
        self._raw_actions, self._raw_poses = actions, poses  # whole trajectory so far, context first
        self._clip_conditioning = clip_conditioning
        self.frames = [frames]  # uint8 pieces of the session's video (context, then generated)
        self.chunks = 0
        self._broken = False
        dit, cfg = model.dit, model.dit.cfg
        if text is None:
            text = fixed_text_context(cfg.text_len, cfg.text_dim, model.config.rollout.text_context or None)
        self.text = jnp.asarray(text)
        # The steps of `rollout.generate`, taken here one chunk at a time because the next chunk's actions are not
        # known in advance.
        t0 = time.perf_counter()
        latents = generate_lib.encode(model.vae, frames[None])
        try:
            cache = dit.init_cache(1, self.capacity, model.latent_hw)
        except ValueError as e:
            raise SessionError(f"max_chunks={max_chunks}: {e}") from e
        cache = engine.prefill(dit, cache, latents, self.text, self._conditioning(0, t, True), chunk=model.chunk)
        # The decoder's causal cache must have seen the context latents for the first generated frames to follow on;
        # one latent per call, the same compiled step that decodes generated latents.
        decoder, _ = generate_lib.warm_decoder(model.vae, latents, piece=1)
        self._rollout = generate_lib.Rollout(dit, model.vae, cache, jax.block_until_ready(decoder), text=self.text,
                                             seeds=[model.seed], chunk=model.chunk, grid=model.latent_hw,
                                             segment_fn=model.segment_fn())
        self.prefill_seconds = time.perf_counter() - t0

    # ---------------------------------------------------------------------------------------------------------------

    @property
    def video(self) -> np.ndarray:
        """uint8 [T, H, W, 3]: the context frames, then every generated frame."""
        return np.concatenate(self.frames)

    @property
    def chunks_left(self) -> int:
        return self.max_chunks - self.chunks

    @property
    def pose(self) -> np.ndarray:
        """The current raw pose (x, y, z, pitch, yaw)."""
        return self._raw_poses[-1].copy()

    def next_poses(self, actions) -> np.ndarray:
        """The raw poses the given chunk of actions leads to (through the world when the session has one)."""
        if self.world is not None:
            return agent_lib.run_actions(self.world, self._raw_poses[-1], actions)[1:].astype(np.float32)
        return free_poses(self._raw_poses[-1], actions)

    def _conditioning(self, first: int, count: int, first_latent: bool):
        """Per-latent conditioning of frames [first, first + count) of the trajectory, normalised as in training
        (positions relative to the clip's first frame, yaw sign and mod 360: `pipeline.clip_conditioning`)."""
        from decmem_jax.rollout.generate import embed_frames

        model = self.model
        if not model.conditioned:
            return None
        acts, poses = self._clip_conditioning(self._raw_actions, self._raw_poses)
        return embed_frames(model.dit, acts[None], poses[None], first, count, first_latent,
                                  embed=model.embed_fn())

    def step(self, actions, poses=None) -> ChunkResult:
        """Generates the next chunk under `actions` (int32 [4 * chunk, 8]); `poses` (float [4 * chunk, 5]) default
        to `next_poses(actions)`. Returns the decoded chunk with its SGM retrieval."""
        pieces = self.stream(actions, poses)
        for _ in pieces:
            pass
        return pieces.result

    def stream(self, actions, poses=None) -> "_ChunkStream":
        """Like `step`, but an iterator of uint8 frame pieces [4, H, W, 3] as each latent is decoded; its `result`
        (a ChunkResult) is set once exhausted. Inputs are checked here, before any work."""
        model = self.model
        n = model.frames_per_chunk
        actions = check_actions(actions, n)
        if poses is None:
            poses = self.next_poses(actions)
        poses = np.asarray(poses, np.float32)
        if poses.shape != (n, POSE_DIM) or not np.isfinite(poses).all():
            raise SessionError(f"poses: expected finite float [{n}, {POSE_DIM}], got {poses.shape}")
        if self._broken:
            raise SessionError("this session stopped in the middle of a chunk (its memory bank holds a chunk that "
                               "was never decoded); start a new session")
        if self.chunks >= self.max_chunks:
            raise SessionFull(f"the memory bank is full: {self.max_chunks} chunks ({self.max_chunks * n} frames) "
                              f"after the context; start a new session (max_chunks sets the room)")
        return _ChunkStream(self, actions, poses)

    def _generate(self, actions, poses) -> Iterator[np.ndarray]:
        from decmem_jax import video

        model = self.model
        t0 = time.perf_counter()
        start = self.context_frames + self.chunks * model.frames_per_chunk
        old_actions, old_poses = self._raw_actions, self._raw_poses
        self._raw_actions = np.concatenate([old_actions, actions])
        self._raw_poses = np.concatenate([old_poses, poses])
        try:
            cond = self._conditioning(start, model.frames_per_chunk, False)
            history = int(self._rollout.cache.length)
            self._broken = True  # until the chunk is decoded: the cache is donated to the call below
            latents, selection = self._rollout.step(None if cond is None else cond[None], 1)
        except BaseException:
            self._raw_actions, self._raw_poses = old_actions, old_poses
            raise
        retrieval = self._retrieval(selection, history) if selection is not None else None
        pieces = []
        ahead = self._rollout.decode_async(latents[:, :1])
        for i in range(model.chunk):
            # The next latent's decode is dispatched before this one is fetched: the device decodes it while the
            # host checks, converts and hands out this piece.
            current = ahead
            if i + 1 < model.chunk:
                ahead = self._rollout.decode_async(latents[:, i + 1: i + 2])
            piece = np.asarray(current)[0]
            if not np.isfinite(piece).all():
                raise SessionError(f"chunk {self.chunks}: non-finite frames generated (check the checkpoint)")
            piece = video.from_model_range(piece)
            pieces.append(piece)
            yield piece
        frames = np.concatenate(pieces)
        self.frames.append(frames)
        self.last = ChunkResult(frames=frames, actions=actions, poses=poses, retrieval=retrieval, index=self.chunks,
                                first_frame=start, seconds=time.perf_counter() - t0)
        self.chunks += 1
        self._broken = False

    def _retrieval(self, selection, history: int) -> np.ndarray:
        """float32 [history latents]: how often each committed latent frame was among the blocks SGM selected for
        the chunk (commit pass; over layers, heads and query blocks), as a share of all selections."""
        ids, counts = (np.asarray(x) for x in selection)  # [1, L, B, H, Q, K], [1, L, B, H, Q]
        valid = np.arange(ids.shape[-1]) < counts[..., None]
        frames = ids[valid] // self.model.memory.blocks_per_frame
        hist = np.bincount(frames[frames < history], minlength=history)[:history].astype(np.float32)
        return hist / max(float(hist.sum()), 1.0)

    def frame_of_latent(self, latent: int) -> np.ndarray:
        """The uint8 frame a latent ends at (latent 0 = frame 0, latent j = frame 4j): a thumbnail for retrieval."""
        return self.video[min(last_frame_of_latent(int(latent)), sum(len(f) for f in self.frames) - 1)]


class _ChunkStream:
    """Iterator over a chunk's decoded pieces; `.result` holds the ChunkResult once it is exhausted."""

    def __init__(self, session: Session, actions, poses):
        self._it = session._generate(actions, poses)
        self._session = session
        self.result: ChunkResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        try:
            return next(self._it)
        except StopIteration:
            self.result = self._session.last
            raise


@dataclasses.dataclass
class WorldClip:
    """A clip of the procedural block world with the world itself, so a session can continue it under new actions
    (poses through the world) and the truth can be rendered for any continuation."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    actions: np.ndarray  # int32 [T, 8]
    poses: np.ndarray  # float32 [T, 5]
    world: object  # decmem_jax.data.world.World

    def render(self, poses) -> np.ndarray:
        """uint8 [N, H, W, 3]: what the world looks like from `poses` [N, 5] (the ground truth of a continuation)."""
        from decmem_jax.data import world as world_lib

        return world_lib.render(self.world, np.asarray(poses, np.float64), self.frames.shape[1:3])


def world_clip(seed: int, frames: int, size=(64, 64), *, revisit: bool = False) -> WorldClip:
    """A `frames`-frame clip of world `seed` walked by the generator's agent (a random walk, or with revisit=True
    the generator's revisit script: look around, walk out, turn round, walk back). Seeds are the world's own, so
    `generate_world`'s training clips (seeded per clip through a SeedSequence) are not reproduced by accident."""
    from decmem_jax.data import world as world_lib

    world = world_lib.build_world(int(seed))
    rng = np.random.default_rng([int(seed), 0x91A7])
    if revisit:
        actions, poses, _ = agent_lib.revisit_trajectory(world, frames - 1, rng)
    else:
        actions, poses = agent_lib.random_explorer(world, frames - 1, rng)
    poses = poses.astype(np.float32)
    video = world_lib.render(world, poses.astype(np.float64), tuple(size))
    return WorldClip(frames=video, actions=actions.astype(np.int32), poses=poses, world=world)
