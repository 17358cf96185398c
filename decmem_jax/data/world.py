"""A deterministic procedural block world (voxels) and a vectorised numpy ray-casting renderer.

World: a periodic ``size x size`` grid of block columns (default 128 x 128, 32 blocks high) built from a seed:
a fractal value-noise height map (heights 3..24), a water level, sand beaches, snow on peaks, grass over dirt over
stone, trees (log trunk + leaf crown) and a few brick pillars (landmarks), all placed deterministically. Block
``(i, j, k)`` fills ``[i, i+1) x [j, j+1) x [k, k+1)`` in world units (x east, y up, z south, Minecraft axes). The
terrain noise is periodic, so the renderer pads the grid with wrapped copies and the view never ends at a wall.

Camera (Minecraft conventions): pose ``(x, y, z, pitch, yaw)`` with (x, y, z) the eye position and angles in degrees;
yaw 0 looks along +z, yaw +90 along -x (yaw increases turning right, seen from above: clockwise); pitch +90 looks
straight down, -90 straight up. Forward vector ``(-sin(yaw) cos(pitch), -sin(pitch), cos(yaw) cos(pitch))``.
Pinhole projection with a horizontal field of view of 70 degrees (``HFOV_DEG``), square pixels, principal point at
the image centre.

Shading: per-material colours with a per-block and per-texel (8 x 8 texels a face) hash-based colour jitter, grass
sides with a green rim, Lambert shading by face normal with a fixed sun (``SUN``) plus ambient, a sky gradient with a
sun disc, and optional linear distance fog towards the sky colour (rays stop at ``view_distance``).

Ray casting: Amanatides-Woo voxel traversal (DDA) vectorised over all rays of a batch of frames, dropping finished
rays every few steps (so the cost follows the number of ray-steps actually needed).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

HFOV_DEG = 70.0
AIR, GRASS, DIRT, STONE, SAND, WATER, LOG, LEAVES, SNOW, BRICK = range(10)
# Base colours (RGB 0..255): top faces, side/bottom faces; texel jitter amplitude; block jitter amplitude.
_TOP = np.array([[0, 0, 0], [96, 160, 56], [134, 96, 67], [122, 122, 122], [220, 208, 160], [48, 90, 196],
                 [160, 130, 84], [58, 118, 40], [242, 244, 250], [152, 74, 60]], np.float32)
_SIDE = _TOP.copy()
_SIDE[GRASS] = _TOP[DIRT]
_SIDE[LOG] = [104, 82, 50]
_TEXEL_JITTER = np.array([0, .07, .09, .10, .05, .03, .12, .16, .03, .09], np.float32)
_BLOCK_JITTER = np.array([0, .05, .05, .06, .04, .02, .04, .08, .02, .07], np.float32)
SUN = np.array([0.45, 0.8, 0.35]) / np.linalg.norm([0.45, 0.8, 0.35])  # direction towards the sun
_AMBIENT = 0.45
_SKY_HORIZON = np.array([182, 212, 242], np.float32)
_SKY_ZENITH = np.array([92, 140, 222], np.float32)
_TEXELS = 8
_K = 8  # DDA steps between compactions; the padding below makes up to _K extra steps safe


@dataclasses.dataclass(frozen=True)
class World:
    """A finished world. ``blocks`` uint8 [size, height, size] (x, y, z) material ids; ``ground`` int [size, size]:
    the standing level (top of the terrain or the water surface) of each column; ``seed`` the world's seed."""

    blocks: np.ndarray
    ground: np.ndarray
    seed: int
    water_level: int

    @property
    def size(self) -> int:
        return self.blocks.shape[0]

    @property
    def height(self) -> int:
        return self.blocks.shape[1]


def _value_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Periodic 2-D value noise in [0, 1]: random lattice every ``cell`` columns, smoothstep interpolation."""
    n = size // cell
    lattice = rng.random((n, n))
    t = (np.arange(size) + 0.5) / cell
    i0 = np.floor(t).astype(int) % n
    i1 = (i0 + 1) % n
    f = t - np.floor(t)
    f = f * f * (3 - 2 * f)
    rows = lattice[i0] * (1 - f)[:, None] + lattice[i1] * f[:, None]  # interpolate along x
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]  # then along z


def _place_tree(blocks, x, z, base, trunk, rng):
    size, height = blocks.shape[0], blocks.shape[1]
    top = base + trunk  # first y above the trunk
    for dy in range(-2, 2):  # crown: two wide layers below the top, two narrow ones from it
        r = 2 if dy < 0 else 1
        for dx in range(-r, r + 1):
            for dz in range(-r, r + 1):
                corner = abs(dx) == r and abs(dz) == r
                if (corner and (dy == 1 or rng.random() < 0.5)) or top + dy >= height:
                    continue
                cx, cz = (x + dx) % size, (z + dz) % size
                if blocks[cx, top + dy, cz] == AIR:
                    blocks[cx, top + dy, cz] = LEAVES
    blocks[x, base:top, z] = LOG


def build_world(seed: int, size: int = 128, height: int = 32) -> World:
    """The world for ``seed`` (same seed, same world). ``size`` must be a multiple of 64."""
    if size % 64 or size <= 0 or height < 32:
        raise ValueError(f"world size must be a positive multiple of 64 and height >= 32, got {size}, {height}")
    rng = np.random.default_rng([int(seed), 0x0B10C])
    weights = np.array([1.0, 0.5, 0.25, 0.12]) * [1.0, 1.0, rng.uniform(0.6, 1.6), rng.uniform(0.6, 1.6)]
    noise = sum(w * _value_noise(rng, size, c) for w, c in zip(weights, (64, 32, 16, 8)))
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    h = np.clip(np.rint(3 + 21 * noise ** rng.uniform(1.1, 1.6)), 3, 24).astype(np.int32)
    water = int(np.clip(np.quantile(h, rng.uniform(0.08, 0.25)), 4, 12))
    snow = int(rng.integers(19, 23))
    y = np.arange(height)[None, :, None]
    hh = h[:, None, :]
    blocks = np.where(y < hh - 4, STONE, np.where(y < hh, DIRT, AIR)).astype(np.uint8)
    beach = (h <= water + 1)[:, None, :]
    blocks[(y >= hh - 3) & (y < hh) & beach] = SAND
    top = np.where(h <= water + 1, SAND, np.where(h >= snow, SNOW, GRASS)).astype(np.uint8)
    np.put_along_axis(blocks, (h - 1)[:, None, :], top[:, None, :], axis=1)
    blocks[(y >= hh) & (y < water)] = WATER
    ground = np.maximum(h, water)
    # Trees on grass, at least 4 columns apart (Chebyshev, wrapped); a few brick pillars as landmarks.
    density = rng.uniform(0.004, 0.014)
    taken = np.zeros((size, size), bool)
    for x, z in rng.integers(0, size, (int(density * size * size * 3), 2)):
        if top[x, z] != GRASS or rng.random() > 1 / 3:
            continue
        near = taken[np.ix_(np.arange(x - 3, x + 4) % size, np.arange(z - 3, z + 4) % size)]
        if near.any() or h[x, z] + 8 > height:
            continue
        taken[x, z] = True
        _place_tree(blocks, x, z, h[x, z], int(rng.integers(4, 7)), rng)
    for x, z in rng.integers(0, size, (int(rng.integers(3, 8)), 2)):
        if not taken[x, z] and h[x, z] >= water and h[x, z] + 8 <= height:
            blocks[x, h[x, z]:h[x, z] + int(rng.integers(3, 8)), z] = BRICK
    return World(blocks, ground, int(seed), water)


def _hash(*ints) -> np.ndarray:
    """Integer hash of int arrays -> float32 in [-1, 1]."""
    vs = [a.astype(np.uint32) for a in np.broadcast_arrays(*(np.asarray(v, np.int64) for v in ints))]
    h = np.full(vs[0].shape, 0x9E3779B9, np.uint32)
    for i, v in enumerate(vs):
        h = h ^ (v * np.uint32((0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1,
                                                                 0xD3A2646C, 0xFD7046C5, 0xB55A4F09)[i % 7]))
        h = (h ^ (h >> np.uint32(15))) * np.uint32(0x2C1B3C6D)
    h = h ^ (h >> np.uint32(13))
    return (h & np.uint32(0xFFFF)).astype(np.float32) / np.float32(32767.5) - np.float32(1.0)


class _Padded:
    """The world grid padded for traversal: ``pad`` wrapped columns on each horizontal side, ``_K + 1`` stone layers
    below and air above, so rays never index outside it (see ``_cast``)."""

    def __init__(self, world: World, view_distance: float):
        self.pad = p = int(math.ceil(view_distance)) + _K + 3
        self.bottom = _K + 1
        b = np.pad(world.blocks, ((p, p), (0, 0), (p, p)), mode="wrap")
        b = np.concatenate([np.full((b.shape[0], self.bottom, b.shape[2]), STONE, np.uint8), b,
                            np.zeros((b.shape[0], _K + 2, b.shape[2]), np.uint8)], axis=1)
        self.shape = b.shape
        self.solid = np.ascontiguousarray(b != AIR).reshape(-1)
        self.mat = np.ascontiguousarray(b).reshape(-1)
        self.ytop = int(np.nonzero((b != AIR).any(axis=(0, 2)))[0].max())  # highest non-air layer
        self.offset = np.array([p, self.bottom, p], np.float64)


def _cast(grid: _Padded, o: np.ndarray, d: np.ndarray, max_t: float):
    """Traverse rays (origins ``o`` [n, 3] in padded coordinates, unit directions ``d`` [n, 3], no zero components);
    returns per ray the hit distance (inf: none within ``max_t`` or escaped upwards), flat cell index and face axis.
    Rays that finish keep stepping until the next compaction (at most ``_K`` steps): the padding absorbs that."""
    n = o.shape[0]
    _, ny, nz = grid.shape
    cell = np.floor(o).astype(np.int32)
    s = np.where(d >= 0, 1, -1).astype(np.int32)
    tm = ((cell + (s > 0) - o) / d).astype(np.float32)
    td = np.abs(1.0 / d).astype(np.float32)
    strides = (s * np.array([ny * nz, nz, 1], np.int32)).astype(np.int32)
    flat = (cell[:, 0] * ny + cell[:, 1]) * nz + cell[:, 2]
    out_t = np.full(n, np.inf, np.float32)
    out_flat = np.zeros(n, np.int32)
    out_axis = np.zeros(n, np.int8)
    inside = grid.solid[flat]  # eye inside a block: report it at distance 0
    out_t[inside], out_flat[inside] = 0.0, flat[inside]
    keep = ~inside
    pix = np.nonzero(keep)[0]
    tmx, tmy, tmz = (np.ascontiguousarray(tm[keep, a]) for a in range(3))
    tdx, tdy, tdz = (np.ascontiguousarray(td[keep, a]) for a in range(3))
    fx, fy, fz = (np.ascontiguousarray(strides[keep, a]) for a in range(3))
    sy, iy, flat = s[keep, 1], cell[keep, 1], flat[keep]
    while pix.size:
        m = pix.size
        alive = np.ones(m, bool)
        # Branch-free steps (numpy's masked ufuncs and np.where are slow on random masks): step along the axis
        # whose boundary is nearest, by adding per-axis increments multiplied by 0/1 masks.
        tmin, ft, it = np.empty(m, np.float32), np.empty(m, np.float32), np.empty(m, np.int32)
        cx, cy, cz = np.empty(m, bool), np.empty(m, bool), np.empty(m, bool)
        for _ in range(_K):
            np.minimum(tmx, tmy, out=tmin)
            np.minimum(tmin, tmz, out=tmin)
            np.equal(tmx, tmin, out=cx)
            np.equal(tmy, tmin, out=cy)
            np.greater(cy, cx, out=cy)  # ties go to x, then y
            np.logical_or(cx, cy, out=cz)
            np.logical_not(cz, out=cz)
            for mask, f, tm_, td_ in ((cx, fx, tmx, tdx), (cy, fy, tmy, tdy), (cz, fz, tmz, tdz)):
                np.multiply(f, mask, out=it)
                np.add(flat, it, out=flat)
                np.multiply(td_, mask, out=ft)
                np.add(tm_, ft, out=tm_)
            np.multiply(sy, cy, out=it)
            np.add(iy, it, out=iy)
            new = grid.solid.take(flat)
            new &= alive
            if new.any():
                k = np.flatnonzero(new)
                idx = pix[k]
                out_t[idx], out_flat[idx] = tmin[k], flat[k]
                out_axis[idx] = cy[k] + 2 * cz[k]
                alive[k] = False
        alive &= iy <= grid.ytop  # above everything: sky
        np.minimum(tmx, tmy, out=tmin)
        np.minimum(tmin, tmz, out=tmin)
        alive &= tmin <= max_t
        k = np.flatnonzero(alive)
        pix, tmx, tmy, tmz, tdx, tdy, tdz, fx, fy, fz, sy, iy, flat = (
            a.take(k) for a in (pix, tmx, tmy, tmz, tdx, tdy, tdz, fx, fy, fz, sy, iy, flat))
    return out_t, out_flat, out_axis


def camera_rays(h: int, w: int, hfov_deg: float = HFOV_DEG) -> np.ndarray:
    """Camera-space unit ray directions [h*w, 3] as (right, up, forward) components, row-major pixels."""
    f = 1.0 / math.tan(math.radians(hfov_deg) / 2) * (w / 2)  # focal length in pixels
    u = (np.arange(w) + 0.5 - w / 2) / f
    v = (h / 2 - np.arange(h) - 0.5) / f
    r = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), -1).reshape(-1, 3)
    return r / np.linalg.norm(r, axis=-1, keepdims=True)


def camera_basis(pitch_deg, yaw_deg) -> np.ndarray:
    """[..., 3, 3] rows (right, up, forward) in world coordinates for Minecraft-convention angles (degrees)."""
    p, y = np.radians(np.asarray(pitch_deg, np.float64)), np.radians(np.asarray(yaw_deg, np.float64))
    fwd = np.stack([-np.sin(y) * np.cos(p), -np.sin(p), np.cos(y) * np.cos(p)], -1)
    right = np.stack([-np.cos(y), np.zeros_like(y), -np.sin(y)], -1)
    up = np.cross(right, fwd)
    return np.stack([right, up, fwd], -2)


def _sky(d: np.ndarray) -> np.ndarray:
    e = np.clip(d[:, 1], 0, 1)[:, None] ** 0.6
    sky = _SKY_HORIZON + (_SKY_ZENITH - _SKY_HORIZON) * e
    sky = np.where(d[:, 1:2] < 0, _SKY_HORIZON * 0.92, sky)
    c = d @ SUN.astype(np.float32)
    glow = np.clip((c - 0.97) / 0.03, 0, 1)[:, None] ** 3
    return sky + (np.array([255, 250, 225], np.float32) - sky) * np.where(c[:, None] > 0.9985, 1.0, 0.5 * glow)


def _shade(world: World, grid: _Padded, o, d, t, flat, axis) -> np.ndarray:
    """Colours [n, 3] of hit points (t finite)."""
    _, ny, nz = grid.shape
    flat = flat.astype(np.int64)
    mat = grid.mat[flat]
    ci = np.stack([flat // (ny * nz), (flat // nz) % ny, flat % nz], -1)
    p = o + d * t[:, None]
    wc = (ci - grid.offset.astype(np.int64)) % np.array([world.size, 1 << 20, world.size])  # wrapped world cell
    fr = np.clip(p - ci, 0, 0.999)  # position within the block
    uv_axes = np.array([[2, 1], [0, 2], [0, 1]])[axis]
    u = np.take_along_axis(fr, uv_axes[:, :1], 1)[:, 0]
    v = np.take_along_axis(fr, uv_axes[:, 1:], 1)[:, 0]
    tu, tv = (u * _TEXELS).astype(np.int32), (v * _TEXELS).astype(np.int32)
    side = axis != 1
    base = np.where(side[:, None], _SIDE[mat], _TOP[mat])
    rim = side & (mat == GRASS) & (tv >= _TEXELS - 2 + (_hash(wc[:, 0], wc[:, 2], tu, world.seed) > 0.4))
    base = np.where(rim[:, None], _TOP[GRASS], base)
    stripes = (mat == LOG) & side
    j_tex = _hash(wc[:, 0], wc[:, 1], wc[:, 2], tu, np.where(stripes, 0, tv), axis, world.seed)
    j_blk = _hash(wc[:, 0], wc[:, 1], wc[:, 2], world.seed, 7)
    col = base * (1 + _TEXEL_JITTER[mat] * j_tex + _BLOCK_JITTER[mat] * j_blk)[:, None]
    normal_sign = -np.sign(np.take_along_axis(d, axis[:, None].astype(np.int64), 1)[:, 0])
    lambert = np.maximum(0.0, normal_sign * SUN[axis]).astype(np.float32)
    return col * (_AMBIENT + (1 - _AMBIENT) * lambert)[:, None]


def render(world: World, poses, size=(64, 64), *, fog: bool = True, view_distance: float = 48.0,
           hfov_deg: float = HFOV_DEG, max_rays: int = 1 << 18) -> np.ndarray:
    """Render frames for ``poses`` [N, 5] (or one pose [5]) = (x, y, z eye, pitch, yaw degrees): uint8 [N, H, W, 3]
    (or [H, W, 3]). Poses may lie anywhere above y = 0 (the world repeats horizontally). Deterministic."""
    poses = np.asarray(poses, np.float64)
    single = poses.ndim == 1
    poses = poses.reshape(-1, 5)
    h, w = size
    cache = world.__dict__.setdefault("_render_cache", {})  # frozen dataclass: cache via __dict__
    grid = cache.get(view_distance) or cache.setdefault(view_distance, _Padded(world, view_distance))
    cam = camera_rays(h, w, hfov_deg)
    out = np.empty((len(poses), h * w, 3), np.uint8)
    per = max(1, max_rays // (h * w))
    for c0 in range(0, len(poses), per):
        ps = poses[c0:c0 + per]
        d = np.matmul(cam[None], camera_basis(ps[:, 3], ps[:, 4])).reshape(-1, 3)
        d = np.where(np.abs(d) < 1e-9, np.where(d < 0, -1e-9, 1e-9), d)  # no zero components (DDA divides)
        pos = ps[:, :3] % np.array([world.size, np.inf, world.size])  # wrap into the central copy
        o = np.repeat(pos + grid.offset, h * w, axis=0)
        t, flat, axis = _cast(grid, o, d, view_distance)
        df = d.astype(np.float32)
        img = _sky(df)
        hit = np.isfinite(t)
        if hit.any():
            col = _shade(world, grid, o[hit], d[hit], t[hit].astype(np.float64), flat[hit], axis[hit])
            if fog:
                f = np.clip((t[hit] - 0.5 * view_distance) / (0.5 * view_distance), 0, 1)[:, None]
                col = col + (img[hit] - col) * f
            img[hit] = col
        out[c0:c0 + len(ps)] = np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape(len(ps), h * w, 3)
    out = out.reshape(len(poses), h, w, 3)
    return out[0] if single else out
