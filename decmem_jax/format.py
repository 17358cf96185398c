"""The WorldMem Minecraft clip format (the layout of WorldMem's released data set), in one place.

A data root holds split folders (`training/`, `validation/`, `test/`), each with paired `<stem>.mp4` / `<stem>.npz`
files (any sub-folder depth). The mp4 is 640x360 RGB at 10 fps; the npz (`np.savez_compressed`) has

    actions  int32   (T, 8)  raw MineDojo MultiDiscrete([3, 3, 4, 25, 25, 8, 244, 36]) vectors; row 0 = no-op,
                             row t = the action that produced observation t from t-1
    poses    float   (T, 5)  [x, y, z, pitch, yaw]: position in world blocks (y = height), angles in degrees;
                             WorldMem's loader also accepts T-1 rows (left-padded with a zero row)

with T = the number of video frames (±1 tolerated, as the reference data has such clips). Used by the generator
(writing), the CSV builder (validating) and the pipeline (reading).

A leaf module (numpy and the standard library only): the model's action conditioning, the data tools, the rollout and
the play controls all read the action layout from here without importing one another.

Frames and latents (`frames_for_latents`, `latents_for_frames`, `latent_of_frame`, ...): the Wan VAE compresses
x4 in time and x8 in space, causally, which fixes how a video's frames line up with the model's latent frames for the
data tools, training, the rollout and the evaluation alike.

The CSV indexes come in two kinds (`check_index_csv` tells them apart before a tool reads one): a video CSV
(`video_path,action_path[,num_frames]`, written by `decmem_jax.data.build_csv`) and a latents CSV (`latent_path,...`,
written by `decmem_jax.data.encode_latents`).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import os
import zipfile
import zlib

import numpy as np

SPLITS = ("training", "validation", "test")
OPTIONAL_SPLITS = ("validation",)  # WorldMem's data has no validation/ folder; generate_world --split all writes one
CSV_FOR_SPLIT = {"training": "train.csv", "validation": "validation.csv", "test": "test.csv"}
CSV_COLUMNS = ("video_path", "action_path")
LATENTS_CSV_COLUMNS = ("latent_path",)  # what the pipeline needs of a latents CSV; encode_latents writes more
# kind -> (required columns, what writes it)
CSV_KINDS = {"video": (CSV_COLUMNS, "python -m decmem_jax.data.build_csv --root DATA (DATA/train.csv, DATA/test.csv)"),
             "latents": (LATENTS_CSV_COLUMNS, "python -m decmem_jax.data.encode_latents (OUT/latents.csv)")}
FPS = 10
FRAME_HW = (360, 640)  # WorldMem frames; the model uses 352x640 (crop), see the pipeline
SKIP_FRAMES = 100  # WorldMem skips the first 100 (reset / low-quality) frames of every video

# MineDojo action vector layout.
ACTION_DIM = 8
ACTION_NVEC = (3, 3, 4, 25, 25, 8, 244, 36)
FORWARD_BACK, STRAFE, JUMP_SNEAK_SPRINT, CAMERA_PITCH, CAMERA_YAW, FUNCTIONAL, CRAFT_ARG, SLOT_ARG = range(8)
CAMERA_NOOP_BIN = 12  # bins cover -180..+180 degrees in 15-degree steps; 11 = -15, 13 = +15
DEG_PER_CAMERA_BIN = 15.0
POSE_DIM = 5  # x, y, z, pitch, yaw
# Two frames show "the same view" when their eyes are within 1 block and their yaw and pitch within 15 degrees (one
# camera-action bin; four walking steps of 0.25 blocks): with the generator's 70-degree field of view they then share
# at least ~55/70 of their width. Used by the memory benchmark's revisit rule and the training retrieval target.
VIEW_TOLERANCES = (1.0, 15.0, 15.0)  # position (blocks), yaw (degrees), pitch (degrees)


# The Wan VAE's compression. Latent 0 holds frame 0 alone, latent j >= 1 holds frames 4j-3 .. 4j: a clip the VAE can
# encode has T = 1 + 4k frames (k + 1 latents), a chunk of c latents that continues one has 4c frames, and an H x W
# frame is an H/8 x W/8 latent.
FRAMES_PER_LATENT = 4  # temporal factor
PIXELS_PER_LATENT = 8  # spatial factor, per side


def is_frame_count(t: int) -> bool:
    """Whether the VAE can encode a clip of t frames (t = 1 + 4k, k >= 0)."""
    return t >= 1 and (t - 1) % FRAMES_PER_LATENT == 0


def frames_for_latents(n: int) -> int:
    """Frames of a clip of n >= 1 latents: 1 + 4(n - 1)."""
    return 1 + FRAMES_PER_LATENT * (n - 1)


def whole_latents(t: int) -> int:
    """Latents whose frames all lie within the first t >= 1 frames; `frames_for_latents` of it is the longest
    encodable prefix of t frames."""
    return (t - 1) // FRAMES_PER_LATENT + 1


def latents_for_frames(t: int) -> int:
    """Latents of a clip of t = 1 + 4k frames. Raises ValueError naming the nearest valid counts otherwise (e.g.
    20 -> "17 or 21")."""
    if is_frame_count(t):
        return whole_latents(t)
    below = frames_for_latents(max(1, whole_latents(t)))
    above = below + FRAMES_PER_LATENT if t > 1 else 1
    raise ValueError(f"got {t} frames; the VAE needs 1 + {FRAMES_PER_LATENT}k frames (k >= 0): nearest valid "
                     f"counts are {f'{below} or {above}' if below < t else above} (pad_to_valid repeats the last "
                     "frame)")


def latent_of_frame(t):
    """The latent that holds frame t (0 for frame 0, then ceil(t / 4)); elementwise for an array of frames."""
    return (np.asarray(t) + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT


def last_frame_of_latent(j):
    """The last frame latent j holds (frame 0 for latent 0, then 4j): the frame that stands for the latent."""
    return FRAMES_PER_LATENT * j


def latent_size(hw) -> tuple[int, int]:
    """The latent (h, w) of frames of size (H, W), both multiples of PIXELS_PER_LATENT."""
    return int(hw[0]) // PIXELS_PER_LATENT, int(hw[1]) // PIXELS_PER_LATENT


def pad_to_valid(frames: np.ndarray) -> tuple[np.ndarray, int]:
    """Pads a [T, ...] array up to the next 1 + 4k frames by repeating its last frame; returns (padded, n_added),
    `padded is frames` when nothing was added. Explicit, so a caller drops the n_added trailing frames it decodes."""
    t = len(frames)
    if t == 0:
        raise ValueError("pad_to_valid needs at least one frame")
    n_added = (-(t - 1)) % FRAMES_PER_LATENT
    return (np.concatenate([frames, np.repeat(frames[-1:], n_added, axis=0)]) if n_added else frames), n_added


def noop(n: int = 1) -> np.ndarray:
    """n no-op action rows, int32 [n, 8] (cameras at the no-op bin)."""
    a = np.zeros((n, ACTION_DIM), np.int32)
    a[:, CAMERA_PITCH] = a[:, CAMERA_YAW] = CAMERA_NOOP_BIN
    return a


def camera_degrees(bins: np.ndarray) -> np.ndarray:
    """Camera bin(s) -> rotation in degrees (12 -> 0, 13 -> +15, 11 -> -15)."""
    return (np.asarray(bins) - CAMERA_NOOP_BIN) * DEG_PER_CAMERA_BIN


def check_clip_arrays(actions: np.ndarray | None, poses: np.ndarray | None,
                      num_frames: int | None = None) -> list[str]:
    """Every problem with one clip's arrays, as short phrases (empty list = valid).

    Checks dtypes, shapes (actions (T, 8); poses (T, 5) or (T-1, 5)), action values within the MultiDiscrete ranges,
    finite poses, and (when num_frames is given) T within ±1 of the video's frame count.
    """
    problems = []
    if actions is None:
        problems.append("missing 'actions'")
    else:
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
            problems.append(f"'actions' has shape {actions.shape}, expected (T, {ACTION_DIM})")
        elif not np.issubdtype(actions.dtype, np.integer):
            problems.append(f"'actions' has dtype {actions.dtype}, expected an integer type (int32)")
        else:
            bad = [i for i, n in enumerate(ACTION_NVEC) if actions.size and
                   (actions[:, i].min() < 0 or actions[:, i].max() >= n)]
            if bad:
                problems.append(f"'actions' values out of range in column(s) {bad} (ranges {ACTION_NVEC})")
    if poses is None:
        problems.append("missing 'poses'")
    else:
        if poses.ndim != 2 or poses.shape[1] != POSE_DIM:
            problems.append(f"'poses' has shape {poses.shape}, expected (T, {POSE_DIM})")
        elif not np.issubdtype(poses.dtype, np.floating):
            problems.append(f"'poses' has dtype {poses.dtype}, expected a float type")
        elif not np.isfinite(poses).all():
            problems.append("'poses' contains NaN or Inf")
    if not problems and actions is not None and poses is not None:
        t = actions.shape[0]
        if poses.shape[0] not in (t, t - 1):
            problems.append(f"'poses' has {poses.shape[0]} rows but 'actions' has {t} (expected T or T-1)")
        if num_frames is not None and abs(num_frames - t) > 1:
            problems.append(f"video has {num_frames} frames but the npz has {t} action rows")
    return problems


# What np.load and reading a member raise for a damaged or foreign file (truncated zip, bad CRC, a pickle, a .npy).
_NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def read_clip_npz(path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The raw 'actions' and 'poses' arrays of a clip npz (None where missing). A missing, truncated, corrupt or
    non-npz file raises ValueError naming the npz (not the video it belongs to)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'} (the clip's npz of "
                         "actions and poses)")
    try:
        with np.load(path) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("holds a single array (.npy), not the npz archive of 'actions' and 'poses'")
            actions = data["actions"] if "actions" in data.files else None
            poses = data["poses"] if "poses" in data.files else None
    except AttributeError:  # np.load returned a bare array, which is no context manager
        raise ValueError(f"{path}: holds a single array (.npy), not the npz archive of 'actions' and 'poses'") \
            from None
    except _NPZ_ERRORS as e:
        raise ValueError(f"{path}: cannot be read as an npz ({type(e).__name__}: {e}); the file is damaged or not "
                         "a clip's npz: regenerate or re-download it") from None
    return actions, poses


def load_clip_arrays(path) -> tuple[np.ndarray, np.ndarray]:
    """(actions int32 [T, 8], poses float32 [T, 5]) from an npz, with a short pose array left-padded by a zero row
    (WorldMem's convention). Raises ValueError naming the npz if it cannot be read or its arrays are invalid."""
    actions, poses = read_clip_npz(path)
    problems = check_clip_arrays(actions, poses)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    poses = poses.astype(np.float32)
    if poses.shape[0] == actions.shape[0] - 1:
        poses = np.concatenate([np.zeros((1, POSE_DIM), np.float32), poses])
    return actions.astype(np.int32), poses


def check_index_csv(path, kind: str) -> list[str]:
    """Checks that `path` is a readable CSV index of `kind` ("video" or "latents", see the module docstring) with at
    least one row, before a tool reads or encodes anything; returns its columns. Raises ValueError whose message
    starts with the file and says what to pass instead: for a missing file, a folder, a binary file (a video or an
    npz given as the CSV), a header without the needed columns (a typo gets a "did you mean"), the other kind of
    CSV, or no rows."""
    required, writer = CSV_KINDS[kind]
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = [n for n in ("train.csv", "test.csv", "validation.csv", "latents.csv")
                  if os.path.isfile(os.path.join(path, n))]
        raise ValueError(f"{path}: is a folder; pass the CSV file itself"
                         + (f" (it holds {', '.join(inside)})" if inside else f", written by {writer}"))
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; the {kind} CSV is written by {writer}")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:  # an incremental decoder: the 64 KiB may end inside a character
        text = None if b"\0" in head else codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=False)
        rows = None if text is None else list(csv.reader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error):
        rows = None
    if rows is None:
        raise ValueError(f"{path}: is a binary file, not a CSV text file (a video or npz passed as the CSV?); pass "
                         f"the {kind} CSV written by {writer}")
    header = [c.strip() for c in rows[0]] if rows else []
    if not header:
        raise ValueError(f"{path}: is empty; the {kind} CSV is written by {writer}")
    # A latents CSV also carries video_path/action_path (the clip each file came from), so the kinds are told apart
    # by latent_path.
    if kind == "video" and "latent_path" in header:
        raise ValueError(f"{path}: is a latents CSV (written by encode_latents), but a video CSV is needed here: "
                         f"pass the one written by {writer}")
    missing = [c for c in required if c not in header]
    if missing:
        if kind == "latents" and all(c in header for c in CSV_COLUMNS):
            raise ValueError(f"{path}: is a video CSV (written by build_csv), but training reads cached latents: "
                             f"encode the clips first and pass the CSV written by {writer}")
        hints = []
        for c in missing:
            near = difflib.get_close_matches(c, header, n=1, cutoff=0.6)
            hints.append(f"{c!r}" + (f" (found {near[0]!r}: a typo?)" if near else ""))
        raise ValueError(f"{path}: the header lacks column {', '.join(hints)}; it has {','.join(header)}, and a "
                         f"{kind} CSV needs {','.join(required)} (as written by {writer})")
    if len(rows) < 2 or not any(any(cell.strip() for cell in row) for row in rows[1:]):
        raise ValueError(f"{path}: has a header but no rows; nothing to read")
    return header


def view_match(poses, tolerances=VIEW_TOLERANCES, xp=np):
    """bool [..., T, T]: frames i and j show the same view (`VIEW_TOLERANCES`). poses [..., T, 5] = x, y, z, pitch,
    yaw in blocks and degrees (yaw wrapped). xp: the array module (numpy, or jax.numpy inside a training step)."""
    pos_tol, yaw_tol, pitch_tol = tolerances
    a, b = poses[..., :, None, :], poses[..., None, :, :]
    dist = xp.sqrt(((a[..., :3] - b[..., :3]) ** 2).sum(-1))
    dyaw = xp.abs((a[..., 4] - b[..., 4] + 180.0) % 360.0 - 180.0)
    dpitch = xp.abs(a[..., 3] - b[..., 3])
    return (dist <= pos_tol) & (dyaw <= yaw_tol) & (dpitch <= pitch_tol)


# Pixel ranges of the model (the VAE's input and output), here rather than in `video` so that code without mp4 I/O
# (the rollout's frames in memory) needs no PyAV.
def to_model_range(frames: np.ndarray) -> np.ndarray:
    """uint8 frames (any shape) -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"to_model_range expects uint8 frames, got dtype {frames.dtype}")
    return frames.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_model_range(frames) -> np.ndarray:
    """Float frames in [-1, 1] -> uint8 ``round((x + 1) * 127.5)`` clipped to [0, 255]; NaN/inf raise ValueError."""
    x = np.asarray(frames, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("from_model_range got non-finite values (NaN/inf)")
    return np.clip(np.rint((x + np.float32(1.0)) * np.float32(127.5)), 0, 255).astype(np.uint8)
