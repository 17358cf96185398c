"""The revisit protocol of the memory benchmark: which generated frames show a view that was seen earlier OUTSIDE the
ALM window, and which ground-truth frames showed it (their "sources"), from the generator's camera poses.

Frames, latents, chunks (`Timeline`)
    Latent 0 is frame 0; latent j >= 1 covers frames 4j-3 .. 4j. The first `context_frames` (1 + 4k) frames are
    teacher-forced into the memory bank (latents 0 .. L_ctx - 1, L_ctx = (context_frames - 1) / 4 + 1); generated
    chunk c holds latents [L_ctx + c*chunk, L_ctx + (c+1)*chunk). While chunk c is generated and committed, its ALM
    window is the latents [end - window, end) with end the chunk's end (the chunk and the window - chunk latents
    before it), and SGM's candidates (`MemoryConfig.candidates = "outside_window"`) are the latents before
    end - window. A frame's window is its chunk's.

View match (`RevisitRule`)
    Frames s and t show the same view when their eye positions are within `pos_tol` blocks (Euclidean, x y z), their
    yaws within `yaw_tol` degrees (wrapped) and their pitches within `pitch_tol` degrees. The defaults (1 block, 15
    and 15 degrees) are one camera-action bin (15 degrees) and four walking steps (0.25 blocks each): with the
    generator's 70-degree horizontal field of view two such frames share at least ~55/70 of their width. The
    generator's own `revisit_pairs` (`agent.find_revisits`) are exact pose matches (1e-3 blocks, 1e-2 degrees), far
    fewer frames.

Revisit frame
    A generated frame t (t >= context_frames) is a revisit frame when (1) some frame s whose latent lies before t's
    window start matches its view (s is a ground-truth source of t), and, with `exclude_window` (default), (2) no
    frame of the committed part of t's window (latents [window start, chunk start)) matches it: a view the window
    still holds does not test the memory. Standing still therefore never makes a revisit.

    Which frames may be sources (`RevisitRule.sources`): "context" (default) only the teacher-forced context frames,
    whose true pixels the memory holds, so that a generated revisit frame can be scored against the truth: a memory
    that works reproduces it. "any" also admits generated frames: the memory then holds the model's own version of
    that view, which the truth does not show (it was never given), so scoring such frames against the truth
    measures how well the model guessed unseen places, not whether it remembers them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from decmem_jax.format import (FRAMES_PER_LATENT, VIEW_TOLERANCES, is_frame_count, latent_of_frame,
                                latents_for_frames, view_match)


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Where each frame of a rollout sits: its latent, its chunk, its ALM window (module docstring)."""

    context_frames: int
    chunk: int  # latents per generated chunk
    window: int  # ALM window in latents, counting the chunk

    def __post_init__(self):
        if not is_frame_count(self.context_frames):
            raise ValueError(f"context_frames={self.context_frames} must be 1 + 4k")
        if self.chunk < 1 or self.window < self.chunk:
            raise ValueError(f"need 1 <= chunk <= window, got chunk={self.chunk}, window={self.window}")

    @property
    def context_latents(self) -> int:
        return latents_for_frames(self.context_frames)

    @property
    def frames_per_chunk(self) -> int:
        """Frames of one generated chunk."""
        return FRAMES_PER_LATENT * self.chunk

    @staticmethod
    def latent(frames) -> np.ndarray:
        """Latent index of each frame (0 for frame 0, then ceil(t / 4))."""
        return latent_of_frame(frames)

    def chunk_of(self, latents) -> np.ndarray:
        """Generated chunk of each generated latent (>= context_latents)."""
        latents = np.asarray(latents)
        if np.any(latents < self.context_latents):
            raise ValueError(f"latents {latents[latents < self.context_latents]} belong to the context")
        return (latents - self.context_latents) // self.chunk

    def chunk_start(self, latents) -> np.ndarray:
        return self.context_latents + self.chunk_of(latents) * self.chunk

    def window_start(self, latents) -> np.ndarray:
        """First latent of the ALM window of each generated latent; earlier latents are SGM's candidates."""
        return self.chunk_start(latents) + self.chunk - self.window

    def num_chunks(self, num_frames: int) -> int:
        """Chunks needed to generate `num_frames` frames (the last one may be truncated)."""
        return -(-num_frames // self.frames_per_chunk)


@dataclasses.dataclass(frozen=True)
class RevisitRule:
    """View-match tolerances (module docstring)."""

    pos_tol: float = VIEW_TOLERANCES[0]  # blocks, Euclidean distance of the eye positions
    yaw_tol: float = VIEW_TOLERANCES[1]  # degrees, wrapped difference
    pitch_tol: float = VIEW_TOLERANCES[2]  # degrees
    exclude_window: bool = True  # a view still held in the committed part of the window is no revisit
    sources: str = "context"  # "context": only teacher-forced frames are sources; "any": generated frames too

    def __post_init__(self):
        if self.sources not in ("context", "any"):
            raise ValueError(f"revisit.sources={self.sources!r}; expected 'context' or 'any'")
        for name in ("pos_tol", "yaw_tol", "pitch_tol"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"revisit.{name}={getattr(self, name)} must be >= 0")

    def matches(self, poses: np.ndarray) -> np.ndarray:
        """bool [T, T]: frames i and j show the same view. poses float [T, 5] = x, y, z, pitch, yaw (degrees)."""
        return view_match(np.asarray(poses, np.float64), (self.pos_tol, self.yaw_tol, self.pitch_tol))


@dataclasses.dataclass(frozen=True)
class Revisits:
    """The revisit frames of one clip (clip frame indices, ascending) and each one's ground-truth source frames."""

    frames: np.ndarray  # int [R]
    sources: tuple[np.ndarray, ...]  # R arrays of clip frame indices, ascending

    def __len__(self) -> int:
        return len(self.frames)

    def query_targets(self, timeline: Timeline) -> dict[int, np.ndarray]:
        """Query latent -> the history latents holding a source of one of its revisit frames (sorted): the blocks
        SGM should retrieve for that query."""
        out: dict[int, set] = {}
        for t, src in zip(self.frames, self.sources):
            out.setdefault(int(timeline.latent(t)), set()).update(timeline.latent(src).tolist())
        return {q: np.array(sorted(s), np.int64) for q, s in sorted(out.items())}

    def to_json(self) -> dict:
        return {"frames": self.frames.tolist(), "sources": [s.tolist() for s in self.sources]}


def check_poses(poses, needed: int, what: str) -> np.ndarray:
    """float64 [T, 5] poses, finite, with at least `needed` rows; ValueError naming `what` otherwise."""
    p = np.asarray(poses)
    if p.ndim != 2 or p.shape[1] != 5:
        raise ValueError(f"{what}: poses must be [T, 5] (x, y, z, pitch, yaw), got shape {p.shape}")
    if len(p) < needed:
        raise ValueError(f"{what}: {len(p)} poses, but context + generated frames = {needed} are needed")
    p = p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError(f"{what}: poses contain NaN or inf")
    return p


def find_revisits(poses, timeline: Timeline, num_frames: int, rule: RevisitRule = RevisitRule()) -> Revisits:
    """Revisit frames among the `num_frames` generated frames (clip frames context_frames .. + num_frames - 1)."""
    end = timeline.context_frames + num_frames
    p = check_poses(poses, end, "find_revisits")[:end]
    match = rule.matches(p)
    latent = timeline.latent(np.arange(end))
    may_source = np.arange(end) < (timeline.context_frames if rule.sources == "context" else end)
    frames, sources = [], []
    for t in range(timeline.context_frames, end):
        ws = int(timeline.window_start(latent[t]))
        src = np.nonzero(match[t] & (latent < ws) & may_source)[0]
        if len(src) == 0:
            continue
        if rule.exclude_window:
            cs = int(timeline.chunk_start(latent[t]))
            if np.any(match[t] & (latent >= ws) & (latent < cs)):
                continue
        frames.append(t)
        sources.append(src.astype(np.int64))
    return Revisits(np.array(frames, np.int64), tuple(sources))
