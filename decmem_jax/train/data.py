"""Training batches: this host's share from the grain pipeline (cached VAE latents) or synthetic latents, trimmed to
whole chunks, then assembled into global arrays sharded over the mesh.

Each `next()` returns (host batch, iterator state after it as bytes): the state is captured per batch so a checkpoint
written after step s resumes at batch s + 1 exactly, however far the live iterator has read ahead.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np

from decmem_jax.format import frames_for_latents, latent_size, noop
from decmem_jax.run_config import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("latents", "synthetic")
LATENT_CHANNELS = 16


def trained_latents(num_latents: int, chunk: int) -> int:
    """Latents used per clip: whole chunks only (teacher forcing pairs every noisy chunk with its clean history)."""
    used = num_latents - num_latents % chunk
    if used == 0:
        raise ConfigError(f"data.clip_latents={num_latents} is shorter than one chunk of {chunk} latents")
    return used


def host_batch_size(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise ConfigError(f"train.batch={global_batch} is not divisible by the {jax.process_count()} processes")
    return global_batch // jax.process_count()


class SyntheticBatches:
    """Deterministic N(0, 1) latents and valid random actions/poses: batch i of process p is a pure function of
    (seed, i, p). For benchmarks and smoke runs; checkpointable like the grain iterator."""

    def __init__(self, batch: int, latents: int, hw: tuple[int, int], seed: int):
        self.batch, self.latents, self.hw, self.seed = batch, latents, tuple(hw), seed
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.position, jax.process_index()])
        self.position += 1
        b, f, t = self.batch, self.latents, frames_for_latents(self.latents)
        actions = np.broadcast_to(noop(1)[0], (b, t, 8)).copy()
        actions[:, 1:, 0] = rng.integers(0, 3, (b, t - 1))  # forward / back / none
        actions[:, 1:, 4] = rng.integers(11, 14, (b, t - 1))  # yaw bins -1 / 0 / +1
        poses = np.concatenate([rng.normal(0, 2, (b, t, 3)), rng.uniform(0, 360, (b, t, 2))], -1)
        poses[:, 0, :3] = 0
        return dict(latents=rng.standard_normal((b, f, *self.hw, LATENT_CHANNELS), dtype=np.float32),
                    actions=actions.astype(np.int32), poses=poses.astype(np.float32))

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


class Batches:
    """Host batches for `cfg` (the run config): `next()` -> (dict of numpy arrays, state bytes)."""

    def __init__(self, cfg, state: bytes | None = None):
        d = cfg.data
        if d.source not in SOURCES:
            raise ConfigError(f"data.source={d.source!r}; expected one of {SOURCES} (training reads cached latents: "
                             "run decmem_jax.data.encode_latents first)")
        self.latents = trained_latents(int(d.clip_latents), int(cfg.train.chunk))
        if self.latents != d.clip_latents:
            log.info("data: clips of %d latents are trained on their first %d (whole chunks of %d)", d.clip_latents,
                     self.latents, cfg.train.chunk)
        batch = host_batch_size(int(cfg.train.batch))
        if d.source == "synthetic":
            self.it = SyntheticBatches(batch, int(d.clip_latents), latent_size(d.size), int(d.seed))
        else:
            from decmem_jax.data.pipeline import DataConfig, make_iterator

            if not d.csv:
                raise ConfigError("data.csv is empty: set --config.data.csv=PATH/latents.csv "
                                 "(written by decmem_jax.data.encode_latents)")
            self.it = make_iterator(DataConfig(
                csv=d.csv, clip_frames=frames_for_latents(int(d.clip_latents)), batch_size=batch, seed=int(d.seed),
                num_epochs=None, source="latents", skip_corrupt=bool(d.skip_corrupt), first_action=d.first_action,
                num_threads=int(d.num_threads), prefetch=int(d.prefetch), size=tuple(d.size),
                cache_latents=bool(d.get("cache_latents", False))))
        if state:
            self.it.set_state(json.loads(state.decode()))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, bytes]:
        raw = next(self.it)
        state = json.dumps(self.it.get_state()).encode()
        f, t = self.latents, frames_for_latents(self.latents)
        batch = dict(latents=np.asarray(raw["latents"][:, :f], np.float32),
                     actions=np.asarray(raw["actions"][:, :t], np.int32),
                     poses=np.asarray(raw["poses"][:, :t], np.float32))
        return batch, state


def to_global(batch: dict, shardings: dict) -> dict:
    """Host-local numpy arrays -> global jax Arrays (each host contributes its rows of the batch)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def write_latent_clips(out_dir, *, clips: int, latents: int, hw: tuple[int, int], seed: int = 0) -> str:
    """A small latent cache in `encode_latents`' format (npz per clip + latents.csv) with smooth random latents and
    random valid actions/poses, for tests and CPU smoke runs without a VAE. Returns the CSV path."""
    import csv
    import os

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    gen = SyntheticBatches(1, latents, hw, seed)
    rows = []
    for i in range(clips):
        example = next(gen)
        # Low-frequency content (a few random sinusoids per channel) that a tiny model can learn quickly.
        yy, xx = np.meshgrid(np.linspace(0, 1, hw[0]), np.linspace(0, 1, hw[1]), indexing="ij")
        freq, phase = rng.uniform(0.5, 2, (4, LATENT_CHANNELS)), rng.uniform(0, 2 * np.pi, (2, LATENT_CHANNELS))
        t = np.arange(latents)[:, None, None, None] / max(latents, 1)
        z = np.sin(2 * np.pi * (freq[0] * yy[..., None] + freq[1] * t) + phase[0]) \
            + np.cos(2 * np.pi * (freq[2] * xx[..., None] + freq[3] * t) + phase[1])
        name = f"clip_{i:04d}.latents.npz"
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, latents=z.astype(np.float32), actions=example["actions"][0], poses=example["poses"][0],
                     frame_start=np.int64(0), num_latents=np.int64(latents))
        os.replace(path + ".tmp", path)
        rows.append(dict(latent_path=name, num_latents=latents, frame_start=0))
    csv_path = os.path.join(out_dir, "latents.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["latent_path", "num_latents", "frame_start"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    return csv_path
