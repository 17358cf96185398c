"""The agent of the block world: MineDojo actions -> poses, a random explorer, and scripted revisit trajectories.

Kinematics (:func:`step_pose`), one action row per 0.1 s frame; a pose is ``(x, y, z, pitch, yaw)``:

* Axes and angles follow Minecraft and :mod:`decmem_jax.data.world`: yaw 0 faces +z, yaw +90 faces -x (increasing
  yaw turns right); pitch +90 looks straight down. Yaw is stored wrapped to (-180, 180], pitch clamped to [-90, 90].
* Camera first: ``pitch += (actions[3] - 12) * 15``, ``yaw += (actions[4] - 12) * 15`` (degrees).
* Then movement along the new yaw on the horizontal plane: ``actions[0]`` 1 = forward, 2 = back; ``actions[1]``
  1 = strafe left, 2 = strafe right; ``STEP`` = 0.25 blocks per frame (diagonals normalised to the same speed).
  Jump/sneak/sprint and the functional actions (indices 2, 5, 6, 7) have no effect.
* The agent is a ``2 RADIUS`` x ``2 RADIUS`` x 1.8 box. Its feet stand on the highest standing level (terrain top
  or water surface) of the columns under its footprint, and ``y = feet + EYE_HEIGHT`` (1.62): the pose's y is the
  eye, a function of (x, z) only. A move is refused if it would leave ``[MARGIN, size - MARGIN]``, climb more than one
  block, or put any block (tree, pillar) inside the body; a refused diagonal/axis move slides along x or z if that
  part is free, otherwise the agent stays in place. Dropping any height is allowed.
* Row 0 of a trajectory is the initial pose with a no-op action; pose row t is the pose after action row t.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from decmem_jax.data.world import AIR, World
from decmem_jax.format import CAMERA_PITCH, CAMERA_YAW, FORWARD_BACK, STRAFE, camera_degrees, noop

STEP = 0.25
EYE_HEIGHT = 1.62
RADIUS = 0.3
MAX_CLIMB = 1
MARGIN = 4.0
PATH_MAX = 160  # longest outbound path of a revisit script (steps)


def wrap_yaw(yaw: float) -> float:
    """Degrees wrapped to (-180, 180]."""
    return 180.0 - ((180.0 - yaw) % 360.0)


def heading(yaw: float) -> tuple[float, float]:
    """Unit (dx, dz) of the yaw direction, with ``heading(yaw + 180) == -heading(yaw)`` exactly."""
    a, sign = wrap_yaw(yaw), 1.0
    if a > 90.0 or a <= -90.0:
        a, sign = wrap_yaw(a - 180.0), -1.0
    r = math.radians(a)
    return -math.sin(r) * sign, math.cos(r) * sign


def _columns(x: float, z: float):
    return slice(math.floor(x - RADIUS), math.floor(x + RADIUS) + 1), slice(math.floor(z - RADIUS),
                                                                          math.floor(z + RADIUS) + 1)


def feet_level(world: World, x: float, z: float) -> int:
    """The standing level under a footprint centred at (x, z)."""
    cx, cz = _columns(x, z)
    return int(world.ground[cx, cz].max())


def blocked(world: World, x: float, z: float, feet_from: int) -> bool:
    """Whether the agent may not stand at (x, z) when coming from feet level ``feet_from``."""
    if not (MARGIN <= x <= world.size - MARGIN and MARGIN <= z <= world.size - MARGIN):
        return True
    feet = feet_level(world, x, z)
    if feet > feet_from + MAX_CLIMB or feet + 2 > world.height:
        return True
    cx, cz = _columns(x, z)
    return bool((world.blocks[cx, feet:feet + 2, cz] != AIR).any())


def eye_pose(world: World, x: float, z: float, pitch: float, yaw: float) -> tuple:
    return (x, feet_level(world, x, z) + EYE_HEIGHT, z, pitch, yaw)


def step_pose(world: World, pose, action, step: float = STEP) -> tuple[tuple, bool]:
    """Apply one action row to ``pose``; returns (new pose, whether the position changed)."""
    x, y, z, pitch, yaw = (float(v) for v in pose)
    pitch = min(90.0, max(-90.0, pitch + float(camera_degrees(action[CAMERA_PITCH]))))
    yaw = wrap_yaw(yaw + float(camera_degrees(action[CAMERA_YAW])))
    fb = {0: 0.0, 1: 1.0, 2: -1.0}.get(int(action[FORWARD_BACK]), 0.0)
    lr = {0: 0.0, 1: 1.0, 2: -1.0}.get(int(action[STRAFE]), 0.0)
    if fb == 0.0 and lr == 0.0:
        return (x, y, z, pitch, yaw), False
    hx, hz = heading(yaw)
    scale = step / math.hypot(fb, lr)
    dx, dz = scale * (fb * hx + lr * hz), scale * (fb * hz - lr * hx)  # left of (hx, hz) is (hz, -hx)
    feet = round(y - EYE_HEIGHT)
    for mx, mz in ((dx, dz), (dx, 0.0), (0.0, dz)):
        if max(abs(mx), abs(mz)) > 1e-9 and not blocked(world, x + mx, z + mz, feet):  # no sub-nanometre slides
            return eye_pose(world, x + mx, z + mz, pitch, yaw), True
    return (x, y, z, pitch, yaw), False


def _action(fb: int = 0, pitch_bins: int = 0, yaw_bins: int = 0) -> np.ndarray:
    a = noop(1)[0]
    a[FORWARD_BACK], a[CAMERA_PITCH], a[CAMERA_YAW] = fb, 12 + pitch_bins, 12 + yaw_bins
    return a


FORWARD, BACK, NOOP = _action(1), _action(2), _action()
TURN_RIGHT, TURN_LEFT, LOOK_DOWN, LOOK_UP = _action(yaw_bins=1), _action(yaw_bins=-1), _action(pitch_bins=1), \
    _action(pitch_bins=-1)


def random_start(world: World, rng: np.random.Generator) -> tuple:
    """A free standing pose: random (x, z) (multiples of 1/64), yaw a multiple of 1/16 degree, pitch 0."""
    for _ in range(10_000):
        x, z = (rng.integers(MARGIN * 64, (world.size - MARGIN) * 64, 2) / 64.0).tolist()
        if not blocked(world, x, z, feet_level(world, x, z)):
            return eye_pose(world, x, z, 0.0, wrap_yaw(rng.integers(0, 360 * 16) / 16.0))
    raise RuntimeError(f"world {world.seed}: no free place to stand")


def _plan(rng: np.random.Generator, was_blocked: bool, pitch: float) -> list[np.ndarray]:
    """The explorer's next macro action (WorldMem-like: forward-biased, repeated actions, turns, brief looks)."""
    if was_blocked:
        return [TURN_RIGHT if rng.random() < 0.5 else TURN_LEFT] * int(rng.integers(3, 9))
    if rng.random() < 0.7:
        return [FORWARD] * int(rng.integers(3, 11))
    kind = rng.choice(6, p=[0.25, 0.25, 0.15, 0.15, 0.1, 0.1])
    if kind == 0:
        return [FORWARD] * int(rng.integers(3, 11))
    if kind == 1:
        return [BACK] * int(rng.integers(2, 6))
    if kind in (2, 3):
        return [TURN_LEFT if kind == 2 else TURN_RIGHT] * int(rng.integers(1, 7))
    k = int(rng.integers(1, 4))  # look up (4) / down (5) by k bins, hold, look back
    look, back = (LOOK_UP, LOOK_DOWN) if kind == 4 else (LOOK_DOWN, LOOK_UP)
    if abs(pitch + (-15 if kind == 4 else 15) * k) > 60:
        return [NOOP]
    hold = [FORWARD if rng.random() < 0.5 else NOOP for _ in range(int(rng.integers(0, 6)))]
    return [look] * k + hold + [back] * k


def run_actions(world: World, pose, actions) -> np.ndarray:
    """Poses float64 [len(actions) + 1, 5]: ``pose`` then the pose after each action (for row-0-less actions)."""
    poses = [tuple(pose)]
    for a in actions:
        poses.append(step_pose(world, poses[-1], a)[0])
    return np.array(poses, np.float64)


def random_explorer(world: World, steps: int, rng: np.random.Generator, start=None):
    """(actions int32 [steps + 1, 8], poses float64 [steps + 1, 5]) of a random walk; row 0 = start, no-op."""
    pose = tuple(start) if start is not None else random_start(world, rng)
    actions, poses = [noop(1)[0]], [pose]
    pending: deque = deque()
    was_blocked = False
    while len(actions) <= steps:
        if not pending:
            pending.extend(_plan(rng, was_blocked, poses[-1][3]))
            was_blocked = False
        a = pending.popleft()
        pose, moved = step_pose(world, poses[-1], a)
        if (a[FORWARD_BACK] or a[STRAFE]) and not moved:
            pending.clear()
            was_blocked = True
        actions.append(a)
        poses.append(pose)
    return np.array(actions, np.int32), np.array(poses, np.float64)


def _reversible(world: World, before, after) -> bool:
    """Whether a forward step from ``before`` reached ``after`` in a straight line and a forward step from ``after``
    turned round returns to ``before`` (so the way back retraces it)."""
    back, moved = step_pose(world, (*after[:4], wrap_yaw(after[4] + 180.0)), FORWARD)
    straight = abs(math.dist((before[0], before[2]), (after[0], after[2])) - STEP) < 1e-9
    return moved and straight and math.dist((back[0], back[2]), (before[0], before[2])) < 1e-9


WAYS_BACK = ("turn", "retrace")


def _outbound_path(world: World, pose, n_path: int, rng: np.random.Generator) -> list:
    """``n_path`` actions from ``pose``: runs of 4-15 forward steps, each checked to be exactly retraceable (free,
    straight, no slide), between runs of 1-3 turns of 15 degrees."""
    out, run, turn = [], int(rng.integers(4, 16)), TURN_RIGHT if rng.random() < 0.5 else TURN_LEFT
    while len(out) < n_path:
        if run > 0:
            nxt, moved = step_pose(world, pose, FORWARD)
            if moved and _reversible(world, pose, nxt):
                out.append(FORWARD)
                pose, run = nxt, run - 1
                continue
        turn = turn if run > 0 else (TURN_RIGHT if rng.random() < 0.5 else TURN_LEFT)
        k = min(int(rng.integers(1, 4)), n_path - len(out))
        out += [turn] * k
        for _ in range(k):
            pose = step_pose(world, pose, turn)[0]
        run = int(rng.integers(4, 16))
    return out


def _undo(path: list, step) -> list:
    """The actions that walk ``path`` backwards: its turns mirrored, each forward step replaced by ``step`` (FORWARD
    after a 180-degree turn, BACK facing as on the way out)."""
    mirror = {True: TURN_LEFT, False: TURN_RIGHT}
    return [step if a[FORWARD_BACK] else mirror[bool(a[CAMERA_YAW] > 12)] for a in path[::-1]]


def revisit_trajectory(world: World, steps: int, rng: np.random.Generator, start=None, way_back: str | None = None):
    """A trajectory of ``steps`` actions that ends where its scripted part began, in the same pose.

    Layout: random exploration (whatever the script leaves), [a 360-degree look-around: 24 right turns, when
    ``steps >= 120``], an outbound path of forward steps and 15-45 degree turns (each step checked to be exactly
    retraceable: free, straight, no slide), then the way back, one of ``WAYS_BACK`` (``None``: drawn from ``rng``,
    even odds): "turn" = a 180-degree turn (12 right turns), the path back (forward steps, turns mirrored) and 12 more
    right turns to the starting heading, so the way back looks the other way and only the end repeats earlier views;
    "retrace" = the path undone in reverse with BACK steps, facing as on the way out, so every outbound view is seen
    again, in reverse order, up to 2 * 160 frames later. Returns (actions [steps + 1, 8], poses [steps + 1, 5], index of
    the first scripted frame). Raises ValueError if ``steps < 26``.
    """
    if way_back is None:
        way_back = WAYS_BACK[int(rng.integers(len(WAYS_BACK)))]
    if way_back not in WAYS_BACK:
        raise ValueError(f"way_back={way_back!r}; expected one of {WAYS_BACK}")
    look = 24 if steps >= 120 else 0
    turns = 24 if way_back == "turn" else 0
    n_path = min(PATH_MAX, (steps - look - turns) // 2)
    if steps < 26 or n_path < 1:
        raise ValueError(f"a revisit trajectory needs at least 26 steps (27 frames), got {steps}")
    actions, poses = random_explorer(world, steps - look - turns - 2 * n_path, rng, start)
    s0 = len(poses) - 1
    pose = tuple(poses[-1])
    script = [TURN_RIGHT] * look
    for a in script:
        pose = step_pose(world, pose, a)[0]
    out = _outbound_path(world, pose, n_path, rng)
    if way_back == "turn":
        script += out + [TURN_RIGHT] * 12 + _undo(out, FORWARD) + [TURN_RIGHT] * 12
    else:  # a BACK step from `after` lands exactly on `before`: the same displacement _reversible checked
        script += out + _undo(out, BACK)
    actions = np.concatenate([actions, np.array(script, np.int32)])
    poses = np.concatenate([poses, run_actions(world, poses[-1], script)[1:]])
    return actions, poses, s0


def patrol_trajectory(world: World, steps: int, rng: np.random.Generator, start=None):
    """A look-round and an outbound path, then that path walked back and forth until ``steps`` actions: BACK steps
    facing as on the way out to the start of the path, the path again, back again, ... Every frame after the outbound
    path shows exactly the view of an earlier frame of the look-round or the path, so a rollout given the frames up to
    the end of the path as context has a known answer for every frame it generates (the memory benchmark's clips).
    Layout: 24 right turns (a 360-degree look-round), an outbound path of ``min(PATH_MAX, (steps - 24) // 2)``
    steps (as in `revisit_trajectory`), then the laps. Returns (actions [steps + 1, 8], poses [steps + 1, 5], index
    of the last frame of the outbound path). Raises ValueError if ``steps < 26``."""
    look = 24
    n_path = min(PATH_MAX, (steps - look) // 2)
    if steps < 26 or n_path < 1:
        raise ValueError(f"a patrol trajectory needs at least 26 steps (27 frames), got {steps}")
    actions, poses = random_explorer(world, 0, rng, start)  # the start pose (random unless given)
    pose = tuple(poses[-1])
    script = [TURN_RIGHT] * look
    for a in script:
        pose = step_pose(world, pose, a)[0]
    out = _outbound_path(world, pose, n_path, rng)
    script += out
    end_of_path = len(poses) - 1 + len(script)
    laps = [_undo(out, BACK), out]
    while len(script) < steps:
        script += laps[0]
        laps.reverse()
    script = script[:steps]
    actions = np.concatenate([actions, np.array(script, np.int32)])
    poses = np.concatenate([poses, run_actions(world, poses[-1], script)[1:]])
    return actions, poses, end_of_path


def find_revisits(poses: np.ndarray, min_gap: int = 20, pos_tol: float = 1e-3, angle_tol: float = 1e-2):
    """Revisit pairs int32 [P, 2]: (i, j), i < j - min_gap + 1, where frame j has frame i's pose (position within
    ``pos_tol`` blocks, angles within ``angle_tol`` degrees), i is the earliest such frame, and the pose changed in
    between (standing still is no revisit)."""
    p = np.asarray(poses, np.float64)
    t = len(p)
    changed = np.concatenate([[0], np.cumsum(np.any(p[1:] != p[:-1], axis=1))])  # id of each run of equal poses
    pairs = []
    for j in range(min_gap, t):
        c = p[:j - min_gap + 1]
        dyaw = np.abs((c[:, 4] - p[j, 4] + 180.0) % 360.0 - 180.0)
        ok = (np.abs(c[:, :3] - p[j, :3]).max(1) <= pos_tol) & (np.abs(c[:, 3] - p[j, 3]) <= angle_tol) & \
             (dyaw <= angle_tol)
        if ok.any():
            i = int(np.argmax(ok))
            if changed[i] != changed[j]:
                pairs.append((i, j))
    return np.array(pairs, np.int32).reshape(-1, 2)
