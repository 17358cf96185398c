"""The frame <-> latent arithmetic of `decmem_jax.format` (the Wan VAE: x4 in time, x8 in space, frame 0 alone)."""

import numpy as np
import pytest

from decmem_jax import format as F


def test_frame_count_rule():
    assert F.latents_for_frames(1) == 1 and F.latents_for_frames(21) == 6 and F.latents_for_frames(81) == 21
    assert [F.is_frame_count(t) for t in (0, 1, 2, 5, 20, 21)] == [False, True, False, True, False, True]
    with pytest.raises(ValueError, match="17 or 21"):
        F.latents_for_frames(20)
    with pytest.raises(ValueError, match="1 or 5"):
        F.latents_for_frames(2)
    with pytest.raises(ValueError, match="valid counts are 1"):
        F.latents_for_frames(0)
    x = np.arange(18)[:, None] * np.ones((1, 2), int)
    padded, n = F.pad_to_valid(x)
    assert n == 3 and len(padded) == 21 and (padded[18:] == x[-1]).all()
    np.testing.assert_array_equal(padded[:18], x)
    same, n0 = F.pad_to_valid(x[:17])
    assert n0 == 0 and len(same) == 17


def test_frames_and_latents_line_up():
    for n in (1, 2, 21, 60):
        t = F.frames_for_latents(n)
        assert F.latents_for_frames(t) == n == F.whole_latents(t) == F.whole_latents(t + 3)
        assert F.latent_of_frame(t - 1) == n - 1 and F.last_frame_of_latent(n - 1) == t - 1
    # Latent 0 <-> frame 0, latent j >= 1 <-> frames 4j-3 .. 4j.
    np.testing.assert_array_equal(F.latent_of_frame(np.arange(10)), [0, 1, 1, 1, 1, 2, 2, 2, 2, 3])
    assert [F.last_frame_of_latent(j) for j in range(3)] == [0, 4, 8]
    assert F.latent_size((352, 640)) == (44, 80)
