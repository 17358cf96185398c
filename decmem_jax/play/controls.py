"""Keys and buttons -> one chunk of MineDojo action rows, shared by `python -m decmem_jax.play` and the notebook.

A chunk is 16 frames (4 latents). The mapping follows what the shipped model saw in training (the generator's
agent, `decmem_jax.data.agent`): rows carry ONE kind of action each (a turn, a look or a step, never two at once),
turns come in runs of a few 15-degree bins, looks in single bins within +-60 degrees. So one chunk is laid out as:
the look (1 frame, 15 degrees), then the turn (3 frames, 45 degrees), then the walk (forward/back) on every
remaining frame; with nothing else held, the whole chunk walks (4 blocks). The agent never strafed or jumped, so
A/D turn (tank controls) rather than strafe, and jump is sent as the action vector says (it has no visible effect on
the shipped model, and the world's agent ignores it: the pose does not change).
"""

from __future__ import annotations

import numpy as np

from decmem_jax.format import CAMERA_NOOP_BIN, CAMERA_PITCH, CAMERA_YAW, FORWARD_BACK, \
    JUMP_SNEAK_SPRINT, noop

CONTROLS = ("forward", "back", "turn_left", "turn_right", "look_up", "look_down", "jump")

# KeyboardEvent.code (layout-independent: WASD stays where it is on AZERTY keyboards) -> control.
KEYMAP = {
    "KeyW": "forward", "KeyS": "back", "KeyA": "turn_left", "KeyD": "turn_right",
    "ArrowUp": "look_up", "ArrowDown": "look_down", "ArrowLeft": "turn_left", "ArrowRight": "turn_right",
    "Space": "jump",
}

LOOK_FRAMES = 1  # 15 degrees of pitch per chunk
TURN_FRAMES = 3  # 45 degrees of yaw per chunk
JUMP_FRAMES = 4
PITCH_LIMIT = 60.0  # the generator's agent never looked further up or down


def controls_for_keys(codes) -> set[str]:
    """The controls of the given KeyboardEvent.code values; unknown codes are ignored."""
    return {KEYMAP[c] for c in codes if isinstance(c, str) and c in KEYMAP}


def chunk_actions(controls, frames: int = 16, pitch: float = 0.0) -> np.ndarray:
    """int32 [frames, 8]: one chunk under a set of controls (names from CONTROLS; unknown names are ignored).
    `pitch` (degrees, the current camera pitch) stops a look at +-PITCH_LIMIT. Opposite controls cancel."""
    held = set(controls) & set(CONTROLS)
    rows = noop(frames)
    walk = ("forward" in held) - ("back" in held)  # +1, -1 or 0
    turn = ("turn_right" in held) - ("turn_left" in held)
    look = ("look_down" in held) - ("look_up" in held)  # MineDojo: positive pitch looks down
    if look and abs(pitch + 15.0 * look * LOOK_FRAMES) > PITCH_LIMIT:
        look = 0
    cursor = 0
    if look:
        rows[cursor: cursor + LOOK_FRAMES, CAMERA_PITCH] = CAMERA_NOOP_BIN + look
        cursor += LOOK_FRAMES
    if turn:
        rows[cursor: cursor + TURN_FRAMES, CAMERA_YAW] = CAMERA_NOOP_BIN + turn
        cursor += TURN_FRAMES
    cursor = min(cursor, frames)
    if walk:
        rows[cursor:, FORWARD_BACK] = 1 if walk > 0 else 2
    if "jump" in held:
        rows[cursor: cursor + JUMP_FRAMES, JUMP_SNEAK_SPRINT] = 1
    return rows
