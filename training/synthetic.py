"""Procedural street-scene video clips with per-frame labels in Cityscapes trainId numbering.

The scene is built in world units (roughly metres): a straight street seen by a forward-moving
camera, so ground textures, facades, parked cars and poles flow outward from the vanishing point
exactly as under real ego-motion. Cars and people move with their own velocities and occlude each
other (painter's order by depth). Each frame is then degraded independently (noise, motion blur,
exposure, glare, dropped rectangles) so that one frame alone is ambiguous while earlier frames of
the same clip still show the true scene. Labels always describe the clean scene.

Everything is drawn from seeded numpy generators: the same ``ClipSpec`` gives identical arrays.
The scene streams are independent of ``degradation`` and ``frames`` (a 6-frame clip equals the
first 6 frames of a 12-frame clip with the same seed), so ``degradation=0`` is the clean rendering.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# IGNORE_INDEX is never produced: labels describe the clean scene even where the image is destroyed.
from tmanet.metrics import IGNORE_INDEX

# Cityscapes trainIds of the classes drawn here.
ROAD, SIDEWALK, BUILDING, POLE, TRAFFIC_SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 10, 11, 13
SYNTHETIC_CLASSES: dict[int, str] = {
    ROAD: "road",
    SIDEWALK: "sidewalk",
    BUILDING: "building",
    POLE: "pole",
    TRAFFIC_SIGN: "traffic sign",
    VEGETATION: "vegetation",
    SKY: "sky",
    PERSON: "person",
    CAR: "car",
}

_Z_MAX = 150.0     # depth beyond which everything collapses onto the horizon band
_Z_NEAR = 0.9      # objects closer than this are behind the image plane's useful range
_WRAP_LEN = 110.0  # approaching movers that pass the camera re-enter this far ahead
_CAR_LEN = 4.3


@dataclass(frozen=True)
class ClipSpec:
    """What to render. Sizes in pixels; speeds in world units (~metres) per frame."""

    frames: int = 16
    height: int = 128
    width: int = 256
    degradation: float = 0.5  # 0 = clean, 1 = heavy
    seed: int = 0
    num_cars: int = 4
    num_people: int = 4
    ego_speed: float = 0.5     # ~30 km/h at 17 fps (Cityscapes video rate)
    pole_spacing: float = 16.0  # mean distance between street poles along the street
    tree_spacing: float = 12.0  # mean distance between sidewalk trees
    color_jitter: float = 1.0   # scales the per-clip colour randomisation (0 = canonical palette)
    camera_shake: float = 1.0   # scales the per-frame horizon bounce / yaw sway

    def __post_init__(self):
        if self.frames < 1 or self.height < 8 or self.width < 8:
            raise ValueError(f"ClipSpec needs frames >= 1 and a size of at least 8x8, got {self}")
        if not 0.0 <= self.degradation <= 1.0:
            raise ValueError(f"degradation must lie in [0, 1], got {self.degradation}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.num_cars < 0 or self.num_people < 0 or self.pole_spacing <= 0 or self.tree_spacing <= 0:
            raise ValueError(f"object counts must be >= 0 and spacings > 0, got {self}")


# --------------------------------------------------------------------------------------------
# Value noise from a fixed lattice table: textures are functions of world/object coordinates, so
# they move with the surface they belong to instead of shimmering from frame to frame. The seed only
# shifts the lattice (period 256 cells), which is far cheaper than an integer hash per corner.
_TABLE = np.random.default_rng(0x7AB1E).random(256 * 256, dtype=np.float32)


def _offsets(seed: int) -> tuple[int, int]:
    seed = int(seed) & 0xFFFFFFFF
    return ((seed * 2654435761) >> 11) & 255, ((seed * 40503 + 12345) >> 5) & 255


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Pseudo-random value in [0, 1) per integer lattice point (int64 arrays)."""
    ox, oy = _offsets(seed)
    return _TABLE[(((ix + ox) & 255) << 8) | ((iy + oy) & 255)]


def _value_noise(u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    fu, fv = np.floor(u), np.floor(v)
    ox, oy = _offsets(seed)
    # int64 so that "& 255" wraps negative coordinates correctly
    r0 = ((fu.astype(np.int64) + ox) & 255) << 8
    r1 = (r0 + 256) & 0xFF00
    c0 = (fv.astype(np.int64) + oy) & 255
    c1 = (c0 + 1) & 255
    tu, tv = (u - fu).astype(np.float32), (v - fv).astype(np.float32)
    tu = tu * tu * (3 - 2 * tu)
    tv = tv * tv * (3 - 2 * tv)
    a, b, c, d = _TABLE[r0 | c0], _TABLE[r1 | c0], _TABLE[r0 | c1], _TABLE[r1 | c1]
    return a + (b - a) * tu + (c - a) * tv + (a - b - c + d) * tu * tv


def _fbm(u: np.ndarray, v: np.ndarray, seed: int, octaves: int = 2) -> np.ndarray:
    out = np.zeros(np.shape(u), np.float32)
    amp, norm = 1.0, 0.0
    for k in range(octaves):
        out += amp * _value_noise(u * (2 ** k), v * (2 ** k), seed + 101 * k)
        norm += amp
        amp *= 0.5
    return out / norm


# --------------------------------------------------------------------------------------------
# Scene description (all randomness is drawn here, once per clip).

@dataclass
class _Palette:
    road: np.ndarray
    sidewalk: np.ndarray
    curb: np.ndarray
    marking: np.ndarray
    veg: np.ndarray
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    cloud: np.ndarray
    cloudiness: float
    window_dark: np.ndarray
    window_bright: np.ndarray
    pole: np.ndarray
    trunk: np.ndarray
    gain: np.ndarray  # per-channel illumination / white balance of the whole clip


@dataclass
class _Blocks:
    """Facade segments along one side of the street."""

    start: np.ndarray   # (n,) street coordinate where each block begins
    is_veg: np.ndarray  # (n,) bool: park / hedge instead of a building
    height: np.ndarray  # (n,)
    color: np.ndarray   # (n, 3)
    floor_h: np.ndarray  # (n,) window grid
    win_sp: np.ndarray   # (n,)


@dataclass
class _Mover:
    kind: str            # "car" | "person"
    x: float             # lateral position (negative = left)
    s: float             # street coordinate at frame 0
    vx: float
    vs: float
    color: np.ndarray
    color2: np.ndarray   # cabin glass / trousers
    color3: np.ndarray   # skin (people)
    facing: int          # cars: +1 seen from behind (tail lights), -1 oncoming (headlights)
    wrap: bool           # re-enter far ahead once passed (approaching movers only)
    seed: int


@dataclass
class _Prop:
    kind: str            # "pole" | "tree"
    x: float
    s: float
    height: float
    sign: int            # -1: none, else index into the sign colour table
    seed: int


@dataclass
class _Scene:
    spec: ClipSpec
    pal: _Palette
    road_half: float
    xb: tuple[float, float]  # facade distance left / right
    blocks: tuple[_Blocks, _Blocks]
    props: list[_Prop]
    movers: list[_Mover]
    cam_h: float
    shake: np.ndarray  # bounce amp, bounce freq, bounce phase, sway amp, sway freq, sway phase
    tex_seed: int


_FACADE_TONES = np.array([[150, 140, 130], [170, 92, 70], [200, 188, 165], [108, 108, 114],
                          [212, 212, 206], [118, 80, 62], [160, 150, 110]], np.float32)
_CAR_TONES = np.array([[200, 200, 205], [32, 32, 36], [150, 22, 26], [32, 62, 140],
                       [120, 125, 130], [190, 170, 122], [42, 92, 62], [88, 90, 96]], np.float32)
_SKIN_TONES = np.array([[228, 188, 158], [190, 140, 102], [122, 82, 56]], np.float32)
_SIGN_COLORS = np.array([[200, 32, 32], [32, 72, 172], [230, 190, 32]], np.float32)


def _color(rng: np.random.Generator, base, spread: float, cj: float) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.normal(0.0, spread * cj, 3), 0, 255).astype(np.float32)


def _make_palette(rng: np.random.Generator, cj: float) -> _Palette:
    grey = rng.uniform(62, 125)
    overcast = rng.random() < 0.35  # grey sky: looks like a concrete facade in one pixel
    sidewalk_base = [[150, 150, 148], [172, 160, 140], [160, 112, 100]][rng.integers(3)]
    return _Palette(
        road=_color(rng, [grey, grey, grey + 4], 7, cj),
        sidewalk=_color(rng, sidewalk_base, 14, cj),
        curb=_color(rng, [178, 178, 172], 10, cj),
        marking=_color(rng, [226, 224, 214] if rng.random() < 0.75 else [222, 188, 72], 8, cj),
        veg=_color(rng, [72, 112, 44], 18, cj),
        sky_zenith=_color(rng, [150, 155, 165] if overcast else [64, 122, 200], 14, cj),
        sky_horizon=_color(rng, [200, 200, 204] if overcast else [186, 206, 228], 10, cj),
        cloud=_color(rng, [232, 232, 236], 6, cj),
        cloudiness=float(rng.uniform(0.2, 0.9)),
        window_dark=_color(rng, [40, 46, 58], 8, cj),
        window_bright=_color(rng, [140, 160, 186], 14, cj),
        pole=_color(rng, [132, 134, 138], 16, cj),
        trunk=_color(rng, [92, 66, 46], 10, cj),
        gain=(rng.uniform(1 - 0.22 * cj, 1 + 0.18 * cj)
              * rng.uniform(1 - 0.07 * cj, 1 + 0.07 * cj, 3)).astype(np.float32),
    )


def _make_blocks(rng: np.random.Generator, s_end: float, cj: float) -> _Blocks:
    # Generated sequentially from a private stream, so a longer clip only appends blocks.
    starts, veg, heights, colors, floors, spacing = [], [], [], [], [], []
    s = -8.0
    while s < s_end:
        starts.append(s)
        is_veg = rng.random() < 0.28
        veg.append(is_veg)
        heights.append(rng.uniform(3.0, 8.0) if is_veg else rng.uniform(6.0, 20.0))
        colors.append(_color(rng, _FACADE_TONES[rng.integers(len(_FACADE_TONES))], 16, cj))
        floors.append(rng.uniform(2.7, 3.5))
        spacing.append(rng.uniform(1.8, 3.2))
        s += rng.uniform(6.0, 20.0)
    return _Blocks(np.array(starts), np.array(veg, bool), np.array(heights, np.float32),
                   np.array(colors, np.float32), np.array(floors, np.float32), np.array(spacing, np.float32))


def _build_scene(spec: ClipSpec) -> _Scene:
    streams = np.random.SeedSequence([spec.seed, 0x5CE2E]).spawn(8)
    r_pal, r_left, r_right, r_poles, r_trees, r_cars, r_people, r_cam = (np.random.default_rng(s) for s in streams)
    cj = spec.color_jitter
    pal = _make_palette(r_pal, cj)
    road_half = float(r_cam.uniform(3.2, 4.4))
    xb = (-float(road_half + r_cam.uniform(2.0, 3.5)), float(road_half + r_cam.uniform(2.0, 3.5)))
    shake = np.array([
        r_cam.uniform(0.3, 1.0) * 0.006 * spec.camera_shake, r_cam.uniform(0.6, 1.3), r_cam.uniform(0, 2 * np.pi),
        r_cam.uniform(0.3, 1.0) * 0.025 * spec.camera_shake, r_cam.uniform(0.05, 0.15), r_cam.uniform(0, 2 * np.pi),
    ])
    s_end = spec.ego_speed * spec.frames + _Z_MAX + 10.0
    blocks = (_make_blocks(r_left, s_end, cj), _make_blocks(r_right, s_end, cj))

    props: list[_Prop] = []
    for kind, rng, spacing in (("pole", r_poles, spec.pole_spacing), ("tree", r_trees, spec.tree_spacing)):
        s = float(rng.uniform(0.0, spacing))
        while s < s_end:
            side = -1.0 if rng.random() < 0.5 else 1.0
            if kind == "pole":
                x = side * (road_half + rng.uniform(0.25, 0.6))
                sign = int(rng.integers(len(_SIGN_COLORS))) if rng.random() < 0.55 else -1
                props.append(_Prop("pole", x, s, float(rng.uniform(3.5, 6.0)), sign, int(rng.integers(1 << 30))))
            else:
                x = side * (road_half + rng.uniform(1.0, 1.6))
                props.append(_Prop("tree", x, s, float(rng.uniform(3.5, 6.5)), -1, int(rng.integers(1 << 30))))
            s += float(rng.uniform(0.4, 1.6) * spacing)

    v = spec.ego_speed
    movers: list[_Mover] = []
    for _ in range(spec.num_cars):
        mode = r_cars.random()
        z0 = float(r_cars.uniform(4.0, 45.0))
        if mode < 0.4:    # same direction, right lane: nearly constant distance, slow drift
            x, vs, facing, wrap = road_half * 0.5 + r_cars.uniform(-0.3, 0.3), v * r_cars.uniform(0.75, 1.2), 1, False
        elif mode < 0.75:  # oncoming, left lane: passes by quickly, then re-enters far ahead
            x, vs, facing, wrap = -road_half * 0.5 + r_cars.uniform(-0.3, 0.3), -v * r_cars.uniform(0.6, 1.2), -1, True
        else:              # parked along a curb: a static occluder moving with the world
            side = -1.0 if r_cars.random() < 0.5 else 1.0
            x, vs, facing, wrap = side * (road_half - 1.1), 0.0, int(side), True
        movers.append(_Mover("car", float(x), z0, 0.0, float(vs),
                             _color(r_cars, _CAR_TONES[r_cars.integers(len(_CAR_TONES))], 12, cj),
                             _color(r_cars, [38, 44, 54], 10, cj), np.zeros(3, np.float32), facing, wrap,
                             int(r_cars.integers(1 << 30))))
    for _ in range(spec.num_people):
        side = -1.0 if r_people.random() < 0.5 else 1.0
        x = side * (road_half + r_people.uniform(0.4, 2.0))
        crossing = r_people.random() < 0.3
        vx = -side * r_people.uniform(0.03, 0.07) if crossing else 0.0
        vs = 0.0 if crossing else r_people.choice([-1.0, 1.0]) * r_people.uniform(0.03, 0.08)
        movers.append(_Mover("person", float(x), float(r_people.uniform(3.0, 40.0)), float(vx), float(vs),
                             r_people.uniform(20, 220, 3).astype(np.float32),
                             _color(r_people, [50, 52, 70], 25, cj),
                             _color(r_people, _SKIN_TONES[r_people.integers(len(_SKIN_TONES))], 8, cj),
                             1, True, int(r_people.integers(1 << 30))))
    return _Scene(spec, pal, road_half, xb, blocks, props, movers, 1.5, shake, int(r_cam.integers(1 << 30)))


# --------------------------------------------------------------------------------------------
# Rendering

@dataclass
class _View:
    f: float    # focal length in pixels
    x_v: float  # vanishing point
    y_h: float
    cam_h: float


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _render_background(sc: _Scene, view: _View, p: float, t: int, img: np.ndarray, lab: np.ndarray) -> None:
    H, W = lab.shape
    pal, ts = sc.pal, sc.tex_seed
    dy = np.arange(H) + 0.5 - view.y_h
    dx = np.arange(W) + 0.5 - view.x_v
    z_g = np.full(H, np.inf)
    below = dy > 0
    z_g[below] = np.minimum(view.cam_h * view.f / dy[below], _Z_MAX)
    left = dx < 0
    xb = np.where(left, -sc.xb[0], sc.xb[1])
    z_f = np.minimum(xb * view.f / np.maximum(np.abs(dx), 1e-6), _Z_MAX)
    ground = z_g[:, None] <= z_f[None, :]  # the ground is visible wherever it is nearer than a facade

    # Ground: road with lane markings, curb, tiled sidewalk.
    gy, gx = np.nonzero(ground)
    z = z_g[gy]
    X = dx[gx] * z / view.f
    s = z + p
    ax = np.abs(X)
    road = ax < sc.road_half
    col = np.empty((gy.size, 3), np.float32)
    tex = _fbm(X * 1.5, s * 1.5, ts + 1)
    grain = _hash01(np.floor(X * 14).astype(np.int64), np.floor(s * 14).astype(np.int64), ts + 2)
    patch = _value_noise(X * 0.35, s * 0.12, ts + 3)
    shade = (0.72 + 0.4 * tex + 0.12 * grain) * np.where(patch > 0.72, 0.78, 1.0)
    col[:] = pal.road * shade[:, None]
    dash = (np.abs(X) < 0.08) & (np.mod(s, 6.0) < 2.8)
    edge = np.abs(ax - (sc.road_half - 0.3)) < 0.08
    paint = road & (dash | edge)
    col[paint] = pal.marking * (0.72 + 0.35 * grain[paint, None])
    walk = ~road
    curb = walk & (ax < sc.road_half + 0.22)
    tiles = walk & ~curb
    joint = (np.mod(X, 0.9) < 0.06) | (np.mod(s, 0.9) < 0.06)
    col[tiles] = pal.sidewalk * ((0.8 + 0.3 * tex[tiles]) * np.where(joint[tiles], 0.8, 1.0))[:, None]
    col[curb] = pal.curb * (0.85 + 0.2 * tex[curb, None])
    img[gy, gx] = col
    lab[gy, gx] = np.where(road, ROAD, SIDEWALK)

    # Sky everywhere else first; facades are painted over it.
    fy, fx = np.nonzero(~ground)
    r = np.clip((view.y_h - (fy + 0.5)) / max(view.y_h, 1.0), 0.0, 1.0) ** 0.7
    sky = pal.sky_horizon + (pal.sky_zenith - pal.sky_horizon) * r[:, None]
    cloud = _fbm(fx / W * 3.0 + 0.01 * t, fy / H * 7.0, ts + 4)
    cmix = _smoothstep(1.0 - 0.5 * pal.cloudiness, 1.05 - 0.3 * pal.cloudiness, cloud) * pal.cloudiness
    img[fy, fx] = sky + (pal.cloud - sky) * cmix[:, None]
    lab[fy, fx] = SKY

    # Facades: vertical planes at the side distances, split into blocks along the street.
    for side in (0, 1):
        m = left[fx] if side == 0 else ~left[fx]
        yy, xx = fy[m], fx[m]
        zf = z_f[xx]
        h = view.cam_h - (yy + 0.5 - view.y_h) * zf / view.f
        sf = zf + p
        blk = sc.blocks[side]
        b = np.clip(np.searchsorted(blk.start, sf, side="right") - 1, 0, len(blk.start) - 1)
        # Ragged hedge / park outline: depends on the street coordinate only, i.e. per column.
        wobble = 2.0 * (_fbm((z_f + p) * 0.6, np.zeros(W), ts + 5 + side) - 0.5)
        top = blk.height[b] + np.where(blk.is_veg[b], wobble[xx], 0.0)
        on = (h >= -0.5) & (h <= top)
        yy, xx, h, sf, b = yy[on], xx[on], h[on], sf[on], b[on]
        veg = blk.is_veg[b]
        seed = ts + 10 + 7 * side
        tex = _fbm(sf * 1.2, h * 1.2, seed)
        col = blk.color[b] * (0.8 + 0.3 * tex)[:, None]
        # Window grid on buildings; brightness per window so that facades are not uniform.
        fh, sp = blk.floor_h[b], blk.win_sp[b]
        fv, fu = np.mod(h, fh) / fh, np.mod(sf, sp) / sp
        win = ~veg & (h > fh * 0.95) & (h < blk.height[b] - 0.6) & (fv > 0.3) & (fv < 0.8) & (fu > 0.2) & (fu < 0.72)
        cell_u = np.floor(sf[win] / sp[win]).astype(np.int64)
        cell_v = np.floor(h[win] / fh[win]).astype(np.int64)
        wl = _hash01(cell_u, cell_v, seed + 1)[:, None]
        col[win] = pal.window_dark + (pal.window_bright - pal.window_dark) * wl
        shop = ~veg & (h < fh * 0.9) & (fu > 0.1) & (fu < 0.9) & (h > 0.3)
        col[shop] *= 0.55
        leaves = _fbm(sf[veg] * 3.0, h[veg] * 3.0, seed + 2, 3)
        col[veg] = pal.veg * (0.35 + 1.0 * leaves)[:, None]
        img[yy, xx] = col
        lab[yy, xx] = np.where(veg, VEGETATION, BUILDING)


class _Painter:
    """Draws world-space shapes of one object at depth z into the frame (painter's algorithm)."""

    def __init__(self, img: np.ndarray, lab: np.ndarray, view: _View):
        self.img, self.lab, self.view = img, lab, view

    def at(self, x: float, z: float) -> "_Painter":
        self.z, self.ppu = z, self.view.f / z
        self.xc = self.view.x_v + x * self.ppu
        self.yg = self.view.y_h + self.view.cam_h * self.ppu
        return self

    def _region(self, lat0, lat1, h0, h1):
        H, W = self.lab.shape
        c0 = max(int(round(self.xc + lat0 * self.ppu)), 0)
        c1 = min(int(round(self.xc + lat1 * self.ppu)), W)
        r0 = max(int(round(self.yg - h1 * self.ppu)), 0)
        r1 = min(int(round(self.yg - h0 * self.ppu)), H)
        if c1 <= c0 or r1 <= r0:
            return None
        lat = (np.arange(c0, c1) + 0.5 - self.xc) / self.ppu
        hgt = (self.yg - (np.arange(r0, r1) + 0.5)) / self.ppu
        return (slice(r0, r1), slice(c0, c1)), lat[None, :], hgt[:, None]

    def shape(self, lat0, lat1, h0, h1, color, label, *, tex=0.0, seed=0, freq=4.0, mask=None):
        """Fill the world box [lat0, lat1] x [h0, h1] (optionally only where mask(lat, h))."""
        reg = self._region(lat0, lat1, h0, h1)
        if reg is None:
            return
        sl, lat, hgt = reg
        keep = None
        if mask is not None:
            keep = np.broadcast_to(mask(lat, hgt), (hgt.shape[0], lat.shape[1]))
            if not keep.any():
                return
        c = np.asarray(color, np.float32)
        if tex:
            u, v = np.meshgrid(lat[0] * freq, hgt[:, 0] * freq)
            c = c * (1.0 - tex / 2 + tex * _value_noise(u, v, seed))[..., None]
        if keep is None:
            self.img[sl] = c
            self.lab[sl] = label
        else:
            self.img[sl][keep] = np.broadcast_to(c, keep.shape + (3,))[keep]
            self.lab[sl][keep] = label


def _draw_car(pt: _Painter, m: _Mover, x: float, z: float) -> None:
    view = pt.view
    body, glass = m.color, m.color2
    # Visible side face (a vertical plane from z to z + length) for cars off the camera axis.
    xs = x - 0.9 if x > 0.9 else (x + 0.9 if x < -0.9 else 0.0)
    if xs != 0.0:
        H, W = pt.lab.shape
        xa = view.x_v + xs * view.f / (z + _CAR_LEN)
        xn = view.x_v + xs * view.f / z
        c0, c1 = max(int(np.floor(min(xa, xn))), 0), min(int(np.ceil(max(xa, xn))), W)
        if c1 > c0:
            cols = np.arange(c0, c1) + 0.5
            zc = xs * view.f / np.where(np.abs(cols - view.x_v) < 1e-6, 1e-6, cols - view.x_v)
            ok = (zc >= z) & (zc <= z + _CAR_LEN)
            cols, zc = cols[ok], zc[ok]
            if cols.size:
                rows = np.arange(H)[:, None] + 0.5
                hgt = view.cam_h - (rows - view.y_h) * zc[None, :] / view.f
                frac = (zc - z)[None, :] / _CAR_LEN
                glass_part = (hgt > 0.95) & (hgt < 1.4) & (frac > 0.2) & (frac < 0.78)
                inside = ((hgt >= 0.0) & (hgt <= 0.95)) | glass_part
                rr, cc = np.nonzero(inside)
                if rr.size:
                    cx = (cols[cc] - 0.5).astype(int)
                    c = np.where(glass_part[rr, cc][:, None], glass, body * 0.78)
                    c = np.where((hgt[rr, cc] < 0.28)[:, None], np.float32(28.0), c)
                    pt.img[rr, cx] = c
                    pt.lab[rr, cx] = CAR
    pt.at(x, z)
    pt.shape(-0.9, 0.9, 0.25, 0.95, body, CAR, tex=0.18, seed=m.seed, freq=3.0)
    pt.shape(-0.75, 0.75, 0.95, 1.42, glass, CAR, tex=0.35, seed=m.seed + 1, freq=2.0,
             mask=lambda lat, h: np.abs(lat) <= 0.75 - 0.3 * (h - 0.95) / 0.47)
    for lo, hi in ((-0.85, -0.45), (0.45, 0.85)):
        pt.shape(lo, hi, 0.0, 0.3, (26, 26, 28), CAR)
    light = (205, 30, 30) if m.facing > 0 else (245, 240, 210)
    for lo, hi in ((-0.85, -0.58), (0.58, 0.85)):
        pt.shape(lo, hi, 0.62, 0.78, light, CAR)
    pt.shape(-0.22, 0.22, 0.35, 0.47, (225, 225, 220), CAR)


def _draw_person(pt: _Painter, m: _Mover, x: float, z: float, t: int) -> None:
    pt.at(x, z)
    swing = 0.07 * np.sin(0.6 * t + m.seed % 7) if (m.vx or m.vs) else 0.0
    pt.shape(-0.2 + swing, -0.03 + swing, 0.0, 0.86, m.color2, PERSON, tex=0.2, seed=m.seed)
    pt.shape(0.03 - swing, 0.2 - swing, 0.0, 0.86, m.color2, PERSON, tex=0.2, seed=m.seed)
    pt.shape(-0.24, 0.24, 0.84, 1.46, m.color, PERSON, tex=0.25, seed=m.seed + 1)
    pt.shape(-0.33, -0.24, 0.9, 1.42, m.color, PERSON)
    pt.shape(0.24, 0.33, 0.9, 1.42, m.color, PERSON)
    pt.shape(-0.13, 0.13, 1.44, 1.72, m.color3, PERSON,
             mask=lambda lat, h: lat ** 2 + (h - 1.58) ** 2 <= 0.13 ** 2)
    pt.shape(-0.13, 0.13, 1.62, 1.74, (40, 30, 24), PERSON,
             mask=lambda lat, h: (lat ** 2 + (h - 1.6) ** 2 <= 0.135 ** 2) & (h > 1.63))


def _draw_prop(pt: _Painter, sc: _Scene, pr: _Prop, z: float) -> None:
    pal = sc.pal
    pt.at(pr.x, z)
    if pr.kind == "pole":
        pt.shape(-0.07, 0.07, 0.0, pr.height, pal.pole, POLE, tex=0.2, seed=pr.seed, freq=2.0)
        if pr.sign >= 0:
            toward = -np.sign(pr.x) * 0.3  # signs hang toward the road
            cx, cy = toward, pr.height - 0.8
            pt.shape(cx - 0.36, cx + 0.36, cy - 0.36, cy + 0.36, (235, 235, 235), TRAFFIC_SIGN,
                     mask=lambda lat, h: (lat - cx) ** 2 + (h - cy) ** 2 <= 0.36 ** 2)
            pt.shape(cx - 0.28, cx + 0.28, cy - 0.28, cy + 0.28, _SIGN_COLORS[pr.sign], TRAFFIC_SIGN,
                     mask=lambda lat, h: (lat - cx) ** 2 + (h - cy) ** 2 <= 0.28 ** 2)
    else:  # Cityscapes labels tree trunks as vegetation too
        pt.shape(-0.12, 0.12, 0.0, pr.height * 0.55, pal.trunk, VEGETATION, tex=0.3, seed=pr.seed, freq=3.0)
        cy, rx, ry = pr.height * 0.72, 1.3, pr.height * 0.3
        seed = pr.seed + 1

        def canopy(lat, h):
            u, v = np.meshgrid(lat[0] * 2.5, h[:, 0] * 2.5)
            return (lat / rx) ** 2 + ((h - cy) / ry) ** 2 <= (0.8 + 0.35 * _value_noise(u, v, seed)) ** 2

        pt.shape(-rx * 1.2, rx * 1.2, cy - ry * 1.2, cy + ry * 1.2, pal.veg, VEGETATION,
                 tex=1.1, seed=seed + 1, freq=5.0, mask=canopy)


def _camera(sc: _Scene, t: int) -> tuple[float, _View]:
    spec = sc.spec
    H, W = spec.height, spec.width
    b_amp, b_f, b_ph, s_amp, s_f, s_ph = sc.shake
    view = _View(f=0.5 * W, x_v=W / 2 + s_amp * W * np.sin(s_f * t + s_ph),
                 y_h=0.4 * H + b_amp * H * np.sin(b_f * t + b_ph), cam_h=sc.cam_h)
    return spec.ego_speed * t, view


def _render_frame(sc: _Scene, t: int) -> tuple[np.ndarray, np.ndarray]:
    H, W = sc.spec.height, sc.spec.width
    p, view = _camera(sc, t)
    img = np.empty((H, W, 3), np.float32)
    lab = np.empty((H, W), np.uint8)
    _render_background(sc, view, p, t, img, lab)

    items = []  # (depth, draw) — farthest first
    for pr in sc.props:
        z = pr.s - p
        if _Z_NEAR < z < _Z_MAX:
            items.append((z, 0, pr))
    for m in sc.movers:
        z = m.s + m.vs * t - p
        if m.wrap and z < _Z_NEAR:
            z = _Z_NEAR + np.mod(z - _Z_NEAR, _WRAP_LEN)
        if _Z_NEAR < z < _Z_MAX:
            items.append((z, 1, m))
    items.sort(key=lambda it: -it[0])
    pt = _Painter(img, lab, view)
    for z, kind, obj in items:
        if kind == 0:
            _draw_prop(pt, sc, obj, z)
        elif obj.kind == "car":
            _draw_car(pt, obj, obj.x, z)
        else:
            # Keep walkers between the facades (triangle-wave reflection).
            lo, hi = sc.xb[0] + 0.4, sc.xb[1] - 0.4
            x = obj.x + obj.vx * t
            span = hi - lo
            x = lo + span - np.abs(np.mod(x - lo, 2 * span) - span)
            _draw_person(pt, obj, float(x), z, t)
    img *= sc.pal.gain
    return img, lab


def render_clip(spec: ClipSpec) -> tuple[np.ndarray, np.ndarray]:
    """Clean frames (F, H, W, 3) uint8 RGB and labels (F, H, W) uint8; ignores ``spec.degradation``."""
    sc = _build_scene(spec)
    frames = np.empty((spec.frames, spec.height, spec.width, 3), np.uint8)
    labels = np.empty((spec.frames, spec.height, spec.width), np.uint8)
    for t in range(spec.frames):
        img, lab = _render_frame(sc, t)
        frames[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        labels[t] = lab
    return frames, labels


# --------------------------------------------------------------------------------------------
# Degradations

def _motion_blur(img: np.ndarray, length: int, angle: float) -> np.ndarray:
    if length <= 1:
        return img
    H, W = img.shape[:2]
    offs = np.arange(length) - (length - 1) / 2.0
    ox = np.round(offs * np.cos(angle)).astype(int)
    oy = np.round(offs * np.sin(angle)).astype(int)
    pad = int(max(np.abs(ox).max(), np.abs(oy).max()))
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    acc = np.zeros_like(img)
    for dx, dy in zip(ox, oy):
        acc += padded[pad + dy:pad + dy + H, pad + dx:pad + dx + W]
    return acc / length


GLARE_DAMAGE_ALPHA = 0.5  # a glare blob destroys a pixel where glare is at least half of its light
BLUR_DAMAGE = 40.0        # ... motion blur where it moved the colour this far (mean |RGB|) from the sharp one


def degrade_frame(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """:func:`degrade_frame_with_damage` without the damage mask."""
    return degrade_frame_with_damage(image, strength, rng)[0]


def degrade_frame_with_damage(image: np.ndarray, strength: float,
                              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One frame's degradation: motion blur, exposure/contrast, glare blobs, noise, dropped rectangles.
    Returns the degraded frame (uint8) and where it was destroyed (bool ``(H, W)``): dropped rectangles,
    glare cores (glare alpha >= :data:`GLARE_DAMAGE_ALPHA`) and pixels the motion blur moved far from
    their sharp colour (> :data:`BLUR_DAMAGE`); noise and exposure leave the scene readable.

    The same random numbers are drawn whatever ``strength`` is and only their effect is scaled, so
    for a given generator state a stronger setting corrupts the frame more (not just differently).
    ``strength <= 0`` returns the frame unchanged and no damage.
    """
    H, W = image.shape[:2]
    u = rng.random(8)
    glare = rng.random((4, 5))
    drops = rng.random((5, 7))
    noise = rng.standard_normal((H, W, 3), dtype=np.float32)
    fill_noise = rng.random((H, W, 3), dtype=np.float32) * 255.0
    img = image.astype(np.float32)
    damage = np.zeros((H, W), bool)
    s = float(strength)
    if s <= 0:
        return (np.clip(img + 0.5, 0, 255).astype(np.uint8) if image.dtype != np.uint8 else image.copy()), damage

    if u[0] < min(1.0, 1.3 * s):
        length = 1 + int(round(s * (0.3 + 0.7 * u[1]) * max(2.0, 0.06 * W)))
        sharp, img = img, _motion_blur(img, length, float(u[2] * np.pi))
        damage |= np.abs(img - sharp).mean(-1) > BLUR_DAMAGE
    contrast = 1.0 - 0.5 * s * u[3]
    gain = 1.0 + s * (u[4] - 0.45)
    img = ((img - 128.0) * contrast + 128.0) * gain

    ys = np.arange(H, dtype=np.float32)[:, None]
    xs = np.arange(W, dtype=np.float32)[None, :]
    for active, cx, cy, rad, inten in glare:
        if active < 0.55 * s:
            sigma = (0.04 + 0.14 * rad) * min(H, W) * (0.6 + 0.4 * s)
            w = np.exp(-((xs - cx * W) ** 2 + (ys - cy * H) ** 2) / (2 * sigma ** 2))
            alpha = min(1.0, s * (0.6 + 0.5 * inten)) * w
            damage |= alpha >= GLARE_DAMAGE_ALPHA
            alpha = alpha[..., None]
            # Pull toward white and push past it so that the blob core clips (over-exposure).
            img = img + (np.float32(255.0) - img) * alpha + 60.0 * alpha

    img = img + noise * np.float32(s * (6.0 + 24.0 * u[5]))

    for active, x0, y0, dw, dh, kind, grey in drops:
        if active < 0.6 * s:
            w = max(1, int((0.08 + 0.27 * dw) * W * (0.5 + 0.5 * s)))
            h = max(1, int((0.08 + 0.27 * dh) * H * (0.5 + 0.5 * s)))
            c0, r0 = int(x0 * (W - w + 1)), int(y0 * (H - h + 1))
            sl = (slice(r0, r0 + h), slice(c0, c0 + w))
            damage[sl] = True
            if kind < 0.4:
                img[sl] = 0.0
            elif kind < 0.7:
                img[sl] = 50.0 + 160.0 * grey
            else:
                img[sl] = fill_noise[sl]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), damage


def _frame_rng(seed: int, t: int) -> np.random.Generator:
    # A stream per (clip seed, frame): independent of the scene streams and of the clip length.
    return np.random.default_rng([seed, 0xDE9, t])


def make_street_clip(spec: ClipSpec) -> tuple[np.ndarray, np.ndarray]:
    """Render and degrade a clip: frames uint8 (F, H, W, 3) RGB, labels uint8 (F, H, W) trainIds."""
    return make_street_clip_with_damage(spec)[:2]


def make_street_clip_with_damage(spec: ClipSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_street_clip` plus where each frame was destroyed: bool (F, H, W) (see
    :func:`degrade_frame_with_damage`; all False for ``degradation=0``)."""
    frames, labels = render_clip(spec)
    damage = np.zeros(labels.shape, bool)
    if spec.degradation > 0:
        for t in range(spec.frames):
            frames[t], damage[t] = degrade_frame_with_damage(frames[t], spec.degradation, _frame_rng(spec.seed, t))
    return frames, labels, damage


# --------------------------------------------------------------------------------------------
# Cityscapes video layout writer

def _as_clip_list(clips) -> list:
    if isinstance(clips, ClipSpec):
        return [clips]
    if (isinstance(clips, tuple) and len(clips) == 2 and isinstance(clips[0], np.ndarray)
            and clips[0].ndim == 4):
        return [clips]
    return list(clips)


def _annotated(annotate, n: int) -> list[int]:
    if annotate is None:
        return list(range(n))
    idx = [annotate] if isinstance(annotate, (int, np.integer)) else list(annotate)
    out = []
    for i in idx:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise ValueError(f"annotated frame index {i} out of range for a {n}-frame clip")
        out.append(j)
    return sorted(set(out))


def write_cityscapes_sequence(
    root,
    clips: ClipSpec | tuple[np.ndarray, np.ndarray] | Iterable[ClipSpec | tuple[np.ndarray, np.ndarray | None]],
    split: str = "train",
    city: str = "synth",
    *,
    first_seq: int = 0,
    first_frame: int = 0,
    annotate: int | Sequence[int] | None = None,
    compress_level: int = 1,
) -> list[Path]:
    """Write clips in the Cityscapes video layout read by ``CityscapesVideo``.

    Clip ``i`` becomes sequence ``first_seq + i``; its frame ``t`` is frame number ``first_frame + t``:
    ``leftImg8bit_sequence/{split}/{city}/{city}_{seq:06d}_{frame:06d}_leftImg8bit.png`` for every
    frame and ``gtFine/{split}/{city}/{city}_{seq:06d}_{frame:06d}_gtFine_labelTrainIds.png`` for the
    annotated ones (``annotate``: None = every frame, or clip-local indices such as 19 for the
    Cityscapes convention; negative indices count from the end). A clip is a ``ClipSpec`` or a
    ``(frames, labels)`` pair; ``labels`` may be None for unannotated clips.
    Returns the written paths, per clip its images then its labels.
    """
    from PIL import Image  # only the writer needs Pillow

    root = Path(root)
    img_dir = root / "leftImg8bit_sequence" / split / city
    gt_dir = root / "gtFine" / split / city
    written: list[Path] = []
    for i, clip in enumerate(_as_clip_list(clips)):
        frames, labels = make_street_clip(clip) if isinstance(clip, ClipSpec) else clip
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"clip {i}: frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != frames.shape[:3] or labels.dtype != np.uint8:
                raise ValueError(f"clip {i}: labels must be uint8 {frames.shape[:3]}, "
                                 f"got {labels.dtype} {labels.shape}")
        seq = first_seq + i
        img_dir.mkdir(parents=True, exist_ok=True)
        for t in range(frames.shape[0]):
            path = img_dir / f"{city}_{seq:06d}_{first_frame + t:06d}_leftImg8bit.png"
            Image.fromarray(frames[t], "RGB").save(path, compress_level=compress_level)
            written.append(path)
        if labels is not None:
            gt_dir.mkdir(parents=True, exist_ok=True)
            for t in _annotated(annotate, frames.shape[0]):
                path = gt_dir / f"{city}_{seq:06d}_{first_frame + t:06d}_gtFine_labelTrainIds.png"
                Image.fromarray(labels[t], "L").save(path, compress_level=compress_level)
                written.append(path)
    return written


__all__ = [
    "SYNTHETIC_CLASSES", "IGNORE_INDEX", "ClipSpec", "make_street_clip", "make_street_clip_with_damage",
    "render_clip", "degrade_frame", "degrade_frame_with_damage",
    "write_cityscapes_sequence",
    "ROAD", "SIDEWALK", "BUILDING", "POLE", "TRAFFIC_SIGN", "VEGETATION", "SKY", "PERSON", "CAR",
]
