"""Procedural shapes: the built-in dataset that needs no download.

Fifteen furniture/object classes built from a handful of primitives (boxes, frusta, ellipsoid
zones, tori) with random proportions, part counts, optional parts and pose. Classes deliberately
share primitives and coarse statistics (table / stool / chair / bench; mug / cup / bottle / vase;
sofa / bed / bench), so telling them apart needs local structure: a backrest, a footring, a handle,
a neck. Every primitive carries a part label, so the same shapes serve part segmentation.

Shapes are y-up (like the official ModelNet and ShapeNet files), rotated about y by a random angle
and tilted slightly, sampled area-weighted on the primitive surfaces with Gaussian noise, then
centred and scaled into the unit sphere. Sample ``i`` of split ``s`` depends only on
``(seed, s, i)``: nothing is stored, every item is generated on request (about 1-1.5 ms for 1024
points on one CPU core, so DataLoader workers keep up with any model).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_PARTS", "SyntheticShapes", "generate_shape", "render_samples"]

BOX, FRUSTUM, ZONE, TORUS = range(4)
TAU = 2 * np.pi


def _rot(axis: str, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _align_y(d: np.ndarray) -> np.ndarray:
    """Rotation taking the +y axis onto the unit vector ``d`` (Rodrigues)."""
    x, y, z = d
    if y < -0.999999:
        return np.diag([1.0, -1.0, -1.0])
    k = np.array([[0.0, x, 0.0], [-x, 0.0, -z], [0.0, z, 0.0]])  # cross product matrix of (0,1,0) x d
    return np.eye(3) + k + k @ k / (1 + y)


class _Shape:
    """Primitives of one shape: kind, 5 parameters, rotation (3,3), centre (3,), part id."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.par: list[tuple[float, ...]] = []
        self.rot: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.part: list[int] = []

    def _add(self, kind, part, center, par, R) -> None:
        self.kind.append(kind)
        self.par.append(tuple(par) + (0.0,) * (5 - len(par)))
        self.rot.append(np.eye(3) if R is None else R)
        self.pos.append(np.asarray(center, dtype=float))
        self.part.append(part)

    def box(self, part, center, half, R=None):
        """Box with half extents ``half`` (hx, hy, hz)."""
        self._add(BOX, part, center, half, R)

    def cyl(self, part, center, r0, r1, h, R=None, caps=(1, 1)):
        """Frustum along local y, radius r0 at y=-h/2 and r1 at y=+h/2; caps 1 = closed."""
        self._add(FRUSTUM, part, center, (r0, r1, h, caps[0], caps[1]), R)

    def rod(self, part, p0, p1, r, r1=None, caps=(1, 1)):
        """Cylinder (or frustum, radius r -> r1) from point p0 to point p1."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        d = p1 - p0
        h = float(np.linalg.norm(d))
        self.cyl(part, (p0 + p1) / 2, r, r if r1 is None else r1, h, _align_y(d / h), caps)

    def bar(self, part, p0, p1, r):
        """Square bar of half width r from point p0 to point p1."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        d = p1 - p0
        h = float(np.linalg.norm(d))
        self.box(part, (p0 + p1) / 2, (r, h / 2, r), _align_y(d / h))

    def zone(self, part, center, radii, y0=-1.0, y1=1.0, R=None):
        """Ellipsoid surface between heights y0 < y1 of the unit sphere (a dome, a bowl, a band)."""
        self._add(ZONE, part, center, (*radii, y0, y1), R)

    def torus(self, part, center, R_, r, arc=TAU, R=None):
        """Torus around local y (ring radius R_, tube r); a partial ``arc`` is centred on +x."""
        self._add(TORUS, part, center, (R_, r, arc), R)

    def areas(self, par: np.ndarray, kind: np.ndarray) -> np.ndarray:
        a, b, c, d, e = par.T
        box = 8 * (a * b + b * c + a * c)
        fru = np.pi * (a + b) * np.hypot(b - a, c) + d * np.pi * a**2 + e * np.pi * b**2
        zone = 2 * np.pi * (a * b + b * c + a * c) / 3 * (e - d)
        tor = 2 * np.pi * a * b * c
        return np.choose(kind, [box, fru, zone, tor])

    def sample(self, n: int, rng: np.random.Generator,
               density_jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Area-weighted surface samples: points (n, 3) and part ids (n,).

        ``density_jitter``: sigma of a log-normal factor on each primitive's share of the points
        (uneven scan density), 0 for exact area weighting.
        """
        kinds, pars = np.array(self.kind), np.array(self.par)
        order = np.argsort(kinds, kind="stable")  # primitives grouped by kind -> contiguous points
        area = self.areas(pars[order], kinds[order]) * rng.lognormal(0, density_jitter, len(kinds))
        idx = np.repeat(order, rng.multinomial(n, area / area.sum()))
        p = pars[idx]
        cuts = np.searchsorted(kinds[idx], np.arange(5))
        u = rng.random((n, 3))
        out = np.empty((n, 3))
        sl = slice(cuts[BOX], cuts[BOX + 1])
        if sl.start < sl.stop:  # boxes: pick a face pair by its area, then a uniform point on it
            h, v = p[sl, :3], u[sl]
            w = np.stack([h[:, 1] * h[:, 2], h[:, 0] * h[:, 2], h[:, 0] * h[:, 1]], 1)
            w = np.cumsum(w, 1)
            axis = (v[:, :1] * w[:, 2:] > w[:, :2]).sum(1)
            q = rng.random(v.shape) * 2 - 1
            q[np.arange(len(axis)), axis] = np.where(v[:, 1] < 0.5, -1.0, 1.0)
            out[sl] = q * h
        sl = slice(cuts[FRUSTUM], cuts[FRUSTUM + 1])
        if sl.start < sl.stop:  # frusta: side (radius linear in height: inverse CDF) or a cap
            r0, r1, hh, c0, c1 = p[sl].T
            v = u[sl]
            side = np.pi * (r0 + r1) * np.hypot(r1 - r0, hh)
            cap0, cap1 = c0 * np.pi * r0**2, c1 * np.pi * r1**2
            s = v[:, 0] * (side + cap0 + cap1)
            cc = v[:, 1] * (r0 + r1) / 2
            t = 2 * cc / (r0 + np.sqrt(r0**2 + 2 * (r1 - r0) * cc) + 1e-12)
            on0, on1 = (s >= side) & (s < side + cap0), s >= side + cap0
            disc = np.sqrt(v[:, 1])
            rad = np.where(on0, r0 * disc, np.where(on1, r1 * disc, r0 + (r1 - r0) * t))
            y = np.where(on0, -hh / 2, np.where(on1, hh / 2, (t - 0.5) * hh))
            phi = v[:, 2] * TAU
            out[sl] = np.stack([rad * np.cos(phi), y, rad * np.sin(phi)], 1)
        sl = slice(cuts[ZONE], cuts[ZONE + 1])
        if sl.start < sl.stop:  # ellipsoid zones: height uniform is area-uniform on a sphere (Archimedes)
            a, b, c, y0, y1 = p[sl].T
            y = y0 + u[sl, 0] * (y1 - y0)
            rho, phi = np.sqrt(np.clip(1 - y**2, 0, None)), u[sl, 1] * TAU
            out[sl] = np.stack([rho * np.cos(phi) * a, y * b, rho * np.sin(phi) * c], 1)
        sl = slice(cuts[TORUS], cuts[TORUS + 1])
        if sl.start < sl.stop:
            a, b, arc = p[sl, 0], p[sl, 1], p[sl, 2]
            th, phi = u[sl, 0] * TAU, (u[sl, 1] - 0.5) * arc
            ring = a + b * np.cos(th)
            out[sl] = np.stack([ring * np.cos(phi), b * np.sin(th), ring * np.sin(phi)], 1)
        rot = np.array(self.rot).reshape(-1, 9)[idx]  # (n, 9) row-major: rot[:, j::3] is column j
        world = out[:, :1] * rot[:, 0::3] + out[:, 1:2] * rot[:, 1::3] + out[:, 2:] * rot[:, 2::3]
        return world + np.array(self.pos)[idx], np.array(self.part)[idx]


# --------------------------------------------------------------------------------------------------
# The classes. Each builder adds primitives (part ids local to the class) with the floor at y = 0.
# --------------------------------------------------------------------------------------------------


def _legs(s, part, rng, top_y, rx, rz, n, r, splay=0.0, square=False):
    """n legs from height top_y to the floor, around an ellipse (rx, rz) (corners when n == 4)."""
    if n == 4:
        xs, zs = np.array([1, -1, -1, 1]) * rx, np.array([1, 1, -1, -1]) * rz
    else:
        ang = rng.uniform(0, TAU) + np.arange(n) * TAU / n
        xs, zs = np.cos(ang) * rx, np.sin(ang) * rz
    for x, z in zip(xs, zs):
        (s.bar if square else s.rod)(part, (x, top_y, z), (x * (1 + splay), 0, z * (1 + splay)), r)


def _table(s, rng):  # top 0, legs 1, shelf/stretchers 2
    w, h = rng.uniform(0.5, 0.9), rng.uniform(0.45, 0.85)
    d, t = w * rng.uniform(0.45, 1.0), rng.uniform(0.015, 0.05)
    if rng.random() < 0.35:  # round top
        s.cyl(0, (0, h - t / 2, 0), w, w, t)
        d = w
        if rng.random() < 0.4:  # pedestal
            s.rod(1, (0, 0.02, 0), (0, h - t, 0), rng.uniform(0.03, 0.08))
            s.cyl(1, (0, 0.015, 0), w * 0.45, w * 0.4, 0.03)
            return
        n, ix, iz = int(rng.integers(3, 6)), w * 0.7, w * 0.7
    else:
        s.box(0, (0, h - t / 2, 0), (w, t / 2, d))
        n, ix, iz = 4, w * rng.uniform(0.8, 0.95), d * rng.uniform(0.75, 0.92)
    lr = rng.uniform(0.015, 0.04)
    _legs(s, 1, rng, h - t, ix, iz, n, lr, splay=rng.uniform(0, 0.1), square=rng.random() < 0.5)
    v = rng.random()
    if v < 0.3:  # lower shelf
        s.box(2, (0, h * rng.uniform(0.15, 0.3), 0), (ix * 0.98, 0.01, iz * 0.98))
    elif v < 0.5 and n == 4:  # apron
        y = h - t - 0.04
        s.box(2, (0, y, iz), (ix, 0.04, 0.01))
        s.box(2, (0, y, -iz), (ix, 0.04, 0.01))


def _chair(s, rng):  # seat 0, legs 1, back 2, arms 3
    w, sh, t = rng.uniform(0.2, 0.3), rng.uniform(0.38, 0.5), rng.uniform(0.03, 0.08)
    d = w * rng.uniform(0.85, 1.2)
    s.box(0, (0, sh - t / 2, 0), (w, t / 2, d))
    if rng.random() < 0.2:  # swivel base
        s.rod(1, (0, 0.06, 0), (0, sh - t, 0), 0.03)
        a0 = rng.uniform(0, TAU)
        for a in a0 + np.arange(5) * TAU / 5:
            s.rod(1, (0, 0.06, 0), (np.cos(a) * w * 1.2, 0.02, np.sin(a) * w * 1.2), 0.02)
    else:
        _legs(s, 1, rng, sh - t, w * 0.88, d * 0.88, 4, rng.uniform(0.012, 0.03), splay=rng.uniform(0, 0.12),
              square=rng.random() < 0.5)
    bh, tilt = rng.uniform(0.3, 0.6), rng.uniform(0, 0.3)
    R = _rot("x", -tilt)
    base = np.array([0, sh, -d])
    up = R @ np.array([0, 1.0, 0])
    if rng.random() < 0.6:  # solid back
        s.box(2, base + up * bh / 2, (w, bh / 2, 0.02), R)
    else:  # slats + top rail
        n = int(rng.integers(2, 6))
        for x in np.linspace(-w * 0.85, w * 0.85, n):
            s.box(2, base + up * bh * 0.45 + [x, 0, 0], (0.012, bh * 0.45, 0.012), R)
        s.box(2, base + up * bh * 0.95, (w, bh * 0.06, 0.02), R)
    if rng.random() < 0.35:
        ah = rng.uniform(0.15, 0.25)
        for x in (-w, w):
            s.box(3, (x, sh + ah, 0), (0.025, 0.015, d * 0.9))
            s.rod(3, (x, sh, d * 0.7), (x, sh + ah, d * 0.7), 0.015)


def _stool(s, rng):  # seat 0, legs 1, footring/stretchers 2
    r, h, t = rng.uniform(0.15, 0.26), rng.uniform(0.35, 0.8), rng.uniform(0.03, 0.07)
    if rng.random() < 0.6:
        s.cyl(0, (0, h - t / 2, 0), r, r, t)
    else:
        s.box(0, (0, h - t / 2, 0), (r, t / 2, r))
    n, splay = int(rng.integers(3, 5)), rng.uniform(0.1, 0.45)
    _legs(s, 1, rng, h - t, r * 0.75, r * 0.75, n, rng.uniform(0.012, 0.028), splay=splay)
    if rng.random() < 0.65:  # one or two footrings
        for y in h * np.array([0.25, 0.55])[: 1 + (rng.random() < 0.3)] * rng.uniform(0.8, 1.2):
            s.torus(2, (0, y, 0), r * 0.75 * (1 + splay * (1 - y / (h - t))), 0.012)


def _lamp(s, rng):  # base 0, pole 1, shade 2
    br = rng.uniform(0.1, 0.2)
    if rng.random() < 0.7:
        s.cyl(0, (0, 0.02, 0), br, br * rng.uniform(0.6, 1), 0.04)
    else:
        s.box(0, (0, 0.025, 0), (br, 0.025, br))
    h = rng.uniform(0.45, 1.2)
    top = np.array([0.0, h, 0.0])
    s.rod(1, (0, 0.04, 0), top, rng.uniform(0.01, 0.025))
    if rng.random() < 0.4:  # bent arm
        a = rng.uniform(0, TAU)
        top2 = top + np.array([np.cos(a) * h * 0.35, rng.uniform(-0.05, 0.15), np.sin(a) * h * 0.35])
        s.rod(1, top, top2, 0.012)
        top = top2
    sr, sh = rng.uniform(0.12, 0.3), rng.uniform(0.12, 0.3)
    if rng.random() < 0.6:
        s.cyl(2, top + [0, sh * 0.2, 0], sr, sr * rng.uniform(0.4, 0.8), sh, caps=(0, 0))
    else:  # dome shade, open below
        s.zone(2, top + [0, sh * 0.1, 0], (sr, sh, sr), y0=-0.1, y1=1.0)


def _mug(s, rng):  # body 0, handle 1
    r, h = rng.uniform(0.25, 0.4), rng.uniform(0.5, 1.1)
    r1 = r * rng.uniform(1.0, 1.2)
    s.cyl(0, (0, h / 2, 0), r, r1, h, caps=(1, 0))
    s.cyl(0, (0, h / 2 + 0.02, 0), r * 0.9, r1 * 0.9, h - 0.04, caps=(1, 0))
    hr = h * rng.uniform(0.22, 0.35)
    s.torus(1, (r * 1.02, h * rng.uniform(0.45, 0.55), 0), hr, rng.uniform(0.025, 0.05),
            rng.uniform(3.0, 3.8), _rot("x", np.pi / 2))


def _cup(s, rng):  # body 0, saucer/foot 1: a mug without a handle, or a stemmed glass
    r, h = rng.uniform(0.22, 0.4), rng.uniform(0.45, 1.1)
    r1 = r * rng.uniform(1.0, 1.4)
    y0 = 0.0
    if rng.random() < 0.35:  # stem + foot
        y0 = h * rng.uniform(0.3, 0.6)
        s.rod(1, (0, 0.02, 0), (0, y0, 0), 0.03)
        s.cyl(1, (0, 0.01, 0), r * 0.8, r * 0.8, 0.02)
    elif rng.random() < 0.4:  # saucer
        s.cyl(1, (0, 0.01, 0), r * 1.8, r * 1.6, 0.02)
        y0 = 0.02
    s.cyl(0, (0, y0 + h / 2, 0), r, r1, h, caps=(1, 0))
    s.cyl(0, (0, y0 + h / 2 + 0.02, 0), r * 0.9, r1 * 0.9, h - 0.04, caps=(1, 0))


def _bottle(s, rng):  # body 0, neck 1, cap 2
    r, bh = rng.uniform(0.12, 0.28), rng.uniform(0.45, 1.0)
    nr, nh = r * rng.uniform(0.25, 0.45), rng.uniform(0.1, 0.35)
    s.cyl(0, (0, bh / 2, 0), r, r, bh, caps=(1, 0))
    sh = r * rng.uniform(0.4, 1.2)
    if rng.random() < 0.5:
        s.zone(0, (0, bh, 0), (r, sh, r), y0=0.0, y1=float(np.sqrt(1 - (nr / r) ** 2)))
        top = bh + sh * np.sqrt(1 - (nr / r) ** 2)
    else:
        s.cyl(0, (0, bh + sh / 2, 0), r, nr, sh, caps=(0, 0))
        top = bh + sh
    s.cyl(1, (0, top + nh / 2, 0), nr, nr, nh, caps=(0, 0))
    if rng.random() < 0.7:
        ch = rng.uniform(0.04, 0.1)
        s.cyl(2, (0, top + nh + ch / 2, 0), nr * 1.15, nr * 1.15, ch)


def _vase(s, rng):  # body 0, foot 1
    n = int(rng.integers(3, 6))
    h = rng.uniform(0.6, 1.3)
    ys = np.linspace(0.05, h, n + 1)
    base = rng.uniform(0.15, 0.3)
    t = np.linspace(0, 1, n + 1)
    bulge, freq, phase = rng.uniform(0.3, 0.9), rng.uniform(0.8, 1.6), rng.uniform(-0.3, 0.3)
    rs = base * (1 + bulge * np.sin(np.pi * t * freq + phase))
    rs[-1] = max(rs[-1], rs[-2] * rng.uniform(0.9, 1.3))  # flared lip
    for i in range(n):
        s.cyl(0, (0, (ys[i] + ys[i + 1]) / 2, 0), rs[i], rs[i + 1], ys[i + 1] - ys[i], caps=(i == 0, 0))
    s.cyl(1, (0, 0.025, 0), rs[0] * rng.uniform(0.8, 1.2), rs[0], 0.05)


def _airplane(s, rng):  # fuselage 0, wings 1, tail 2, engines 3
    L, r = rng.uniform(1.5, 2.5), rng.uniform(0.07, 0.14)
    Rz = _rot("z", -np.pi / 2)  # local y -> +x
    s.cyl(0, (0, 0, 0), r, r, L * 0.7, Rz, caps=(0, 0))
    s.zone(0, (L * 0.35, 0, 0), (r, r * rng.uniform(1.5, 3), r), y0=0, y1=1, R=Rz)
    s.cyl(0, (-L * 0.45, 0, 0), r * 0.25, r, L * 0.2, Rz, caps=(1, 0))
    span, chord = rng.uniform(0.6, 1.2), rng.uniform(0.12, 0.25)
    sweep, x = rng.uniform(0, 0.6), L * rng.uniform(-0.05, 0.12)
    for side in (-1, 1):
        Rw = _rot("y", -side * sweep)
        center = (x - np.sin(sweep) * span / 2, -r * 0.3, side * np.cos(sweep) * span / 2)
        s.box(1, center, (chord, 0.012, span / 2), Rw)
    xt, th = -L * 0.5, rng.uniform(0.15, 0.35)
    s.box(2, (xt + th * 0.3, r + th / 2, 0), (chord * 0.6, th / 2, 0.01), _rot("z", rng.uniform(0, 0.5)))
    ts = rng.uniform(0.2, 0.4)
    s.box(2, (xt, 0, 0), (chord * 0.4, 0.01, ts))
    ne = int(rng.choice([0, 2, 4], p=[0.25, 0.5, 0.25]))
    for i in range(ne):
        z = (1 if i % 2 else -1) * span * (0.3 if i < 2 else 0.6)
        s.cyl(3, (x - abs(z) * np.sin(sweep) + chord * 0.5, -r * 0.3 - 0.07, z), 0.05, 0.05, chord * 1.5, Rz)


def _stairs(s, rng):  # steps 0, rails 1
    n, rise = int(rng.integers(3, 10)), rng.uniform(0.12, 0.2)
    run, w = rng.uniform(0.2, 0.32), rng.uniform(0.3, 0.6)
    solid = rng.random() < 0.5  # treads + risers + stepped side panels, or open treads on stringers
    for i in range(n):
        y = (i + 1) * rise
        s.box(0, (i * run, y - 0.015, 0), (run / 2, 0.015, w))
        if solid:
            s.box(0, (i * run - run / 2, y - rise / 2, 0), (0.01, rise / 2, w))
            for z in (-w, w):
                s.box(0, (i * run, y / 2, z), (run / 2, y / 2, 0.01))
    if not solid:
        for z in (-w, w):
            s.rod(0, (-run / 2, 0, z), ((n - 0.5) * run, n * rise, z), 0.03)
    if rng.random() < 0.6:
        for z in (-w, w)[: 1 + (rng.random() < 0.5)]:
            p0, p1 = np.array([0, rise + 0.5, z]), np.array([(n - 1) * run, n * rise + 0.5, z])
            s.rod(1, p0, p1, 0.02)
            for p in (p0, p1):
                s.rod(1, p, p - [0, 0.5, 0], 0.015)


def _sofa(s, rng):  # seat 0, back 1, arms 2
    w, d, sh = rng.uniform(0.6, 1.2), rng.uniform(0.35, 0.5), rng.uniform(0.3, 0.45)
    s.box(0, (0, sh / 2 + 0.05, 0), (w, sh / 2 - 0.02, d))
    nc = int(rng.integers(1, 4))
    cw = w / nc
    for i in range(nc):
        s.box(0, (-w + cw * (2 * i + 1), sh + 0.05, d * 0.1), (cw * 0.97, 0.06, d * 0.85))
    bh, bt = rng.uniform(0.3, 0.6), rng.uniform(0.08, 0.15)
    s.box(1, (0, (sh + bh) / 2 + 0.05, -d + bt), (w, (sh + bh) / 2, bt), _rot("x", -rng.uniform(0, 0.2)))
    if rng.random() < 0.85:
        ah, at = rng.uniform(0.1, 0.3), rng.uniform(0.06, 0.15)
        for x in (-w - at, w + at):
            s.box(2, (x, (sh + ah) / 2 + 0.05, 0), (at, (sh + ah) / 2, d))
    if rng.random() < 0.5:
        _legs(s, 0, rng, 0.05, w * 0.95, d * 0.9, 4, 0.02)


def _bench(s, rng):  # seat 0, legs 1, back 2
    w, d = rng.uniform(0.6, 1.2), rng.uniform(0.15, 0.3)
    h, t = rng.uniform(0.35, 0.5), rng.uniform(0.02, 0.06)
    if rng.random() < 0.5:  # slats
        n = int(rng.integers(2, 5))
        for z in np.linspace(-d, d, n):
            s.box(0, (0, h - t / 2, z), (w, t / 2, d / n * 0.8))
    else:
        s.box(0, (0, h - t / 2, 0), (w, t / 2, d))
    if rng.random() < 0.5:  # slab ends
        for x in (-w * 0.85, w * 0.85):
            s.box(1, (x, (h - t) / 2, 0), (0.025, (h - t) / 2, d * 0.9))
    else:
        for x in np.linspace(-w * 0.9, w * 0.9, int(rng.integers(2, 4))):
            for z in (-d * 0.8, d * 0.8):
                s.rod(1, (x, h - t, z), (x, 0, z * (1 + rng.uniform(0, 0.3))), 0.02)
    if rng.random() < 0.5:
        bh = rng.uniform(0.2, 0.45)
        R = _rot("x", -rng.uniform(0, 0.3))
        s.box(2, np.array([0, h, -d]) + R @ [0, bh / 2, 0], (w, bh / 2, 0.02), R)


def _bed(s, rng):  # mattress 0, boards 1, frame 2
    w, L = rng.uniform(0.5, 1.0), rng.uniform(0.95, 1.1)
    fh, mt = rng.uniform(0.15, 0.35), rng.uniform(0.08, 0.15)
    s.box(2, (0, fh - 0.04, 0), (w, 0.04, L))
    s.box(0, (0, fh + mt, 0), (w * 0.97, mt, L * 0.97))
    for i in range(int(rng.integers(0, 3))):
        x = 0 if rng.random() < 0.3 else (i - 0.5) * w
        s.zone(0, (x, fh + 2 * mt + 0.03, -L * 0.8), (w * 0.4, 0.05, L * 0.12))
    hh = rng.uniform(0.3, 0.8)
    s.box(1, (0, (fh + hh) / 2, -L - 0.03), (w, (fh + hh) / 2, 0.03))
    if rng.random() < 0.5:
        fb = rng.uniform(0.05, 0.3)
        s.box(1, (0, (fh + fb) / 2 + mt, L + 0.03), (w, (fh + fb) / 2 + mt, 0.03))
    if rng.random() < 0.6:
        _legs(s, 2, rng, fh - 0.08, w * 0.95, L * 0.95, 4, 0.03, square=True)


def _bookshelf(s, rng):  # frame 0, shelves 1, back 2
    w, h, d, t = rng.uniform(0.3, 0.7), rng.uniform(1.0, 2.0), rng.uniform(0.12, 0.2), rng.uniform(0.01, 0.03)
    for x in (-w, w):
        s.box(0, (x, h / 2, 0), (t, h / 2, d))
    s.box(0, (0, h - t, 0), (w, t, d))
    s.box(0, (0, t + 0.03 * (rng.random() < 0.5), 0), (w, t, d))
    n = int(rng.integers(2, 6))
    for y in np.linspace(0, h, n + 2)[1:-1]:
        s.box(1, (0, y, 0), (w - t, t, d))
    if rng.random() < 0.3:
        s.box(0, (0, h / 2, 0), (t, h / 2, d))
    if rng.random() < 0.7:
        s.box(2, (0, h / 2, -d), (w, h / 2, 0.005))


def _guitar(s, rng):  # body 0, neck 1, head 2
    r1, th = rng.uniform(0.16, 0.24), rng.uniform(0.04, 0.1)
    r2 = r1 * rng.uniform(0.65, 0.85)
    Rx = _rot("x", np.pi / 2)  # disc axis along z
    s.cyl(0, (0, r1, 0), r1, r1, th, Rx)
    s.cyl(0, (0, 2 * r1 + r2 * 0.6, 0), r2, r2, th, Rx)
    top = 2 * r1 + r2 * 1.4
    nl = rng.uniform(0.45, 0.75)
    s.box(1, (0, top + nl / 2, th * 0.3), (0.025, nl / 2, 0.015))
    hl = rng.uniform(0.1, 0.18)
    R = _rot("x", -rng.uniform(0.0, 0.3))
    s.box(2, np.array([0, top + nl, th * 0.3]) + R @ [0, hl / 2, 0], (0.04, hl / 2, 0.012), R)


# class name -> (builder, number of parts)
_BUILDERS = {"table": (_table, 3), "chair": (_chair, 4), "stool": (_stool, 3), "lamp": (_lamp, 3),
             "mug": (_mug, 2), "cup": (_cup, 2), "bottle": (_bottle, 3), "vase": (_vase, 2),
             "airplane": (_airplane, 4), "stairs": (_stairs, 2), "sofa": (_sofa, 3), "bench": (_bench, 3),
             "bed": (_bed, 3), "bookshelf": (_bookshelf, 3), "guitar": (_guitar, 3)}
SYNTHETIC_CLASSES: list[str] = list(_BUILDERS)
_OFFSETS = np.cumsum([0] + [n for _, n in _BUILDERS.values()])
#: class name -> its global part ids (like :data:`~pointbert.data.official.SHAPENETPART_PARTS`).
SYNTHETIC_PARTS: dict[str, tuple[int, ...]] = {
    name: tuple(range(int(_OFFSETS[i]), int(_OFFSETS[i + 1]))) for i, name in enumerate(_BUILDERS)}


def generate_shape(label: int, num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random shape of class ``label``: points (num_points, 3) float32 in the unit sphere and part
    ids (num_points,).

    After the class builder: uneven density (each primitive's share of the points x lognormal(0, 0.4)),
    anisotropic stretch (each axis x U(0.7, 1.4)), with probability 0.3 a
    one-sided occlusion (the 10-35% of the surface beyond a random plane is not seen, as in a scan),
    Gaussian noise, a random rotation about y with a small tilt, and unit-sphere normalisation.
    """
    s = _Shape()
    _BUILDERS[SYNTHETIC_CLASSES[label]][0](s, rng)
    occlude = rng.random() < 0.3
    pts, parts = s.sample(num_points * 8 // 5 if occlude else num_points, rng, density_jitter=0.4)
    pts = pts * rng.uniform(0.7, 1.4, 3)
    pts -= pts.mean(0)
    if occlude:
        a = rng.uniform(0, TAU)
        proj = pts @ np.array([np.cos(a), rng.uniform(-0.3, 0.3), np.sin(a)])
        keep = np.flatnonzero(proj < np.quantile(proj, rng.uniform(0.65, 0.9)))
        keep = rng.choice(keep, num_points, replace=False)
        pts, parts = pts[keep] - pts[keep].mean(0), parts[keep]
    scale = np.abs(pts).max()
    pts += rng.normal(0, rng.uniform(0.003, 0.008) * scale, pts.shape)  # scan-like noise
    tilt = _rot("x", rng.normal(0, 0.05)) @ _rot("z", rng.normal(0, 0.05))
    pts = pts @ (tilt @ _rot("y", rng.uniform(0, TAU))).T
    pts -= pts.mean(0)
    pts /= np.sqrt((pts**2).sum(1).max())
    return pts.astype(np.float32), parts + _OFFSETS[label]


class SyntheticShapes:
    """Procedurally generated labelled shapes; items follow the dataset sample contract.

    ``__getitem__(i)`` returns ``{"points": (N, 3) float32, "label": int64, "parts": (N,) int64,
    "category": int64}`` (``category == label``; part ids index :data:`SYNTHETIC_PARTS`), generated from
    ``(seed, split, i)`` alone, so any worker reproduces any item. Classes are balanced (i % C).

    Args:
        split: any name; ``train`` and ``test`` have default sizes 2000 and 500, others 500.
        num_points: N points per shape.
        size: number of shapes (default by split).
        seed: dataset seed.
    """

    DEFAULT_SIZES = {"train": 2000, "test": 500}

    def __init__(self, split: str = "train", num_points: int = 1024, size: int | None = None, seed: int = 0):
        self.split, self.num_points, self.seed = split, int(num_points), int(seed)
        self.size = int(size if size is not None else self.DEFAULT_SIZES.get(split, 500))
        self.classes = list(SYNTHETIC_CLASSES)
        self.labels = np.arange(self.size, dtype=np.int64) % len(self.classes)
        self._split_key = zlib.crc32(split.encode())

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} synthetic shapes")
        i %= self.size
        rng = np.random.default_rng([self.seed, self._split_key, i])
        label = self.labels[i]
        pts, parts = generate_shape(int(label), self.num_points, rng)
        return {"points": pts, "label": np.int64(label), "parts": parts.astype(np.int64),
                "category": np.int64(label)}

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, size={self.size}, num_points={self.num_points}, "
                f"classes={len(self.classes)}, seed={self.seed})")


def render_samples(path: str | Path, per_class: int = 3, num_points: int = 1024, seed: int = 0,
                   color_parts: bool = True) -> Path:
    """Write a PNG grid (one row per class, ``per_class`` columns) of synthetic shapes, y up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = len(SYNTHETIC_CLASSES)
    fig = plt.figure(figsize=(2.5 * per_class, 2.5 * C))
    for c in range(C):
        for j in range(per_class):
            rng = np.random.default_rng([seed, c, j])
            pts, parts = generate_shape(c, num_points, rng)
            ax = fig.add_subplot(C, per_class, c * per_class + j + 1, projection="3d")
            colors = parts - _OFFSETS[c] if color_parts else pts[:, 1]
            ax.scatter(pts[:, 0], pts[:, 2], pts[:, 1], c=colors, s=1.5, vmin=0 if color_parts else -1,
                       vmax=9 if color_parts else 1, cmap="tab10" if color_parts else "viridis")
            ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
            ax.view_init(elev=20, azim=-60)
            ax.set_axis_off()
            if j == 0:
                ax.set_title(SYNTHETIC_CLASSES[c], fontsize=9, loc="left")
    fig.subplots_adjust(0, 0, 1, 0.98, 0, 0.05)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
