"""The WorldMem Minecraft clip format, in one place (`../shared/reference/worldmem_data_and_peers.md` §1–2).

A data root holds split folders (`training/`, `validation/`, `test/`), each with paired `<stem>.mp4` / `<stem>.npz`
files (any sub-folder depth). The mp4 is 640x360 RGB at 10 fps; the npz (`np.savez_compressed`) has

    actions  int32   (T, 8)  raw MineDojo MultiDiscrete([3, 3, 4, 25, 25, 8, 244, 36]) vectors; row 0 = no-op,
                             row t = the action that produced observation t from t-1
    poses    float   (T, 5)  [x, y, z, pitch, yaw]: position in world blocks (y = height), angles in degrees;
                             WorldMem's loader also accepts T-1 rows (left-padded with a zero row)

with T = the number of video frames (±1 tolerated, as the reference data has such clips). Used by the generator
(writing), the CSV builder (validating) and the pipeline (reading).
"""

from __future__ import annotations

import numpy as np

SPLITS = ("training", "validation", "test")
CSV_FOR_SPLIT = {"training": "train.csv", "test": "test.csv"}  # validation is optional and gets no CSV by default
CSV_COLUMNS = ("video_path", "action_path")
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


def load_clip_arrays(path) -> tuple[np.ndarray, np.ndarray]:
    """(actions int32 [T, 8], poses float32 [T, 5]) from an npz, with a short pose array left-padded by a zero row
    (WorldMem's convention). Raises ValueError naming the file if the arrays are invalid."""
    with np.load(path) as data:
        actions = data["actions"] if "actions" in data else None
        poses = data["poses"] if "poses" in data else None
    problems = check_clip_arrays(actions, poses)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    poses = poses.astype(np.float32)
    if poses.shape[0] == actions.shape[0] - 1:
        poses = np.concatenate([np.zeros((1, POSE_DIM), np.float32), poses])
    return actions.astype(np.int32), poses
