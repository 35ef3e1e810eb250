"""Matrix Lie groups acting on R^1 / R^2 for LieConv: T(1), T(2), SO(2), R×SO(2), SE(2).

Every group offers the maps LieConv needs (Finzi et al. 2020, §4; EquivCNP, Kawano et al. 2021, §4):

* `exp(a)` / `log(g)` between Lie-algebra coordinates `a (..., lie_dim)` and matrices `g (..., m, m)`,
  with Taylor branches near 0 so that both are smooth and finite at the identity;
* `lift(x)` of a point `x (..., x_dim)` to a group element `a` and an orbit coordinate `q (..., q_dim)` (one lift
  sample, deterministic: see `SE2` for how the stabiliser is handled);
* `pairs(x_u, x_v)` -> the kernel input `[log(v^{-1} u), q_u, q_v]` and the group distance, both **invariant** under the
  group acting on `x`: this invariance is the whole source of the model's equivariance;
* `act(a, x)` / `random_element(...)`: the group action on points, used by tests and the zero-shot experiment.

Design choices (the papers are silent or the original code differs; each is tested):

* SO(2) and R×SO(2) act about the origin; the origin is a singular point of their lift (angle undefined, log r = -inf).
  The lift clamps r >= `eps` (1e-6) so nothing becomes NaN; equivariance holds for points away from the origin.
* SE(2) acts on R^2 with stabiliser SO(2). A single fixed lift sample (θ = π in the EquivCNP code) is only translation
  equivariant; random stabiliser samples (LieConv) are equivariant only in distribution. We instead lift each *pair*
  with the stabiliser element aligned with the pair (u = T(x_u) R(β), v = T(x_v) R(β), β = angle of x_u - x_v), which
  is exactly SE(2)-invariant. For scalar fields this is what integrating the stabiliser out leaves: the kernel sees
  log(v^{-1} u) = (0, |x_u - x_v|, 0), i.e. SE(2) convolutions on scalar fields are isotropic.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LieGroup", "T1", "T2", "SO2", "RxSO2", "SE2", "get_group", "GROUPS", "sinc", "cosc", "wrap_angle"]

_TAYLOR_EPS = 7e-2  # below this |θ| the closed forms lose precision in float32 (same threshold as LieConv)


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """Wrap angles to (-π, π]."""
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


def sinc(x: torch.Tensor) -> torch.Tensor:
    """sin(x)/x with a Taylor branch near 0: 1 - x²/6 + x⁴/120."""
    small = x.abs() < _TAYLOR_EPS
    safe = torch.where(small, torch.ones_like(x), x)
    x2 = x * x
    return torch.where(small, 1 - x2 / 6 + x2 * x2 / 120, torch.sin(safe) / safe)


def cosc(x: torch.Tensor) -> torch.Tensor:
    """(1 - cos x)/x² with a Taylor branch near 0: 1/2 - x²/24 + x⁴/720."""
    small = x.abs() < _TAYLOR_EPS
    safe = torch.where(small, torch.ones_like(x), x)
    x2 = x * x
    return torch.where(small, 0.5 - x2 / 24 + x2 * x2 / 720, (1 - torch.cos(safe)) / (safe * safe))


def _rot(theta: torch.Tensor) -> torch.Tensor:
    """Rotation matrices `(..., 2, 2)` for angles `(...)`."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


class LieGroup:
    """Base class. Subclasses set `name`, `x_dim` (space acted on), `lie_dim`, `q_dim` and `mat_dim`."""

    name: str = ""
    x_dim: int = 0
    lie_dim: int = 0
    q_dim: int = 0
    mat_dim: int = 0
    eps: float = 1e-6

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha (weight of the Lie-algebra part of the distance) must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)

    @property
    def embed_dim(self) -> int:
        """Width of the kernel input `[log(v^{-1}u), q_u, q_v]`."""
        return self.lie_dim + 2 * self.q_dim

    # -- group structure ---------------------------------------------------------------------------------------
    def exp(self, a: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Matrix exponential of Lie-algebra coordinates `a` `(..., lie_dim)`: group elements `(..., m, m)`."""
        raise NotImplementedError

    def log(self, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Lie-algebra coordinates `(..., lie_dim)` of group elements `g` `(..., m, m)` (inverse of `exp`)."""
        raise NotImplementedError

    def compose(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Group product `g h` of matrices `(..., m, m)`."""
        return g @ h

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        """Group inverse of matrices `(..., m, m)`."""
        return torch.linalg.inv(g)

    def identity(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Identity elements `(*shape, m, m)`."""
        return torch.eye(self.mat_dim, dtype=dtype).expand(*shape, self.mat_dim, self.mat_dim).clone()

    # -- lifting and pairs -------------------------------------------------------------------------------------
    def lift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """`x (..., x_dim)` -> (`a (..., lie_dim)`, `q (..., q_dim)`)."""
        raise NotImplementedError

    def pair_log(self, a_u: torch.Tensor, a_v: torch.Tensor) -> torch.Tensor:
        """log(v^{-1} u) `(..., lie_dim)` for algebra coordinates `a_u, a_v (..., lie_dim)` broadcast against each
        other; generic matrix route."""
        return self.log(self.compose(self.inverse(self.exp(a_v)), self.exp(a_u)))

    def distance_from_pair(self, pair: torch.Tensor, q_u: torch.Tensor, q_v: torch.Tensor) -> torch.Tensor:
        """α‖log(v^{-1}u)‖ + (1-α)‖q_u - q_v‖ `(...)` (LieConv default), from `pair (..., lie_dim)` and
        `q_u, q_v (..., q_dim)`."""
        d = self.alpha * pair.norm(dim=-1)
        if self.q_dim:
            d = d + (1 - self.alpha) * (q_u - q_v).norm(dim=-1)
        return d

    def pairs(self, x_u: torch.Tensor, x_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel inputs and distances for all broadcast pairs.

        Args:
            x_u (`torch.Tensor` of shape `(..., x_dim)`): query points u.
            x_v (`torch.Tensor` of shape `(..., x_dim)`): key points v (broadcastable against `x_u`).

        Returns:
            `(embedding (..., embed_dim), distance (...))`, both invariant under the group acting on both point sets.
        """
        a_u, q_u = self.lift(x_u)
        a_v, q_v = self.lift(x_v)
        pair = self.pair_log(a_u, a_v)
        q_u, q_v = torch.broadcast_tensors(q_u, q_v)
        q_u = q_u.expand(*pair.shape[:-1], self.q_dim)
        q_v = q_v.expand(*pair.shape[:-1], self.q_dim)
        emb = torch.cat([pair, q_u, q_v], dim=-1)
        return emb, self.distance_from_pair(pair, q_u, q_v)

    def distance(self, x_u: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
        """Group distance of broadcast pairs `(...)`; equals `pairs(x_u, x_v)[1]` without building the embedding."""
        a_u, q_u = self.lift(x_u)
        a_v, q_v = self.lift(x_v)
        return self.distance_from_pair(self.pair_log(a_u, a_v), q_u, q_v)

    # -- action on points (tests, augmentation, zero-shot shifts) ----------------------------------------------
    def act(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Apply the element with algebra coordinates `a (lie_dim,)` to points `x (..., x_dim)`."""
        raise NotImplementedError

    def random_element(self, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        """Algebra coordinates `(lie_dim,)` of a random element (uniform angle,
        translations/log-scales ~ N(0, scale²))."""
        return torch.randn(self.lie_dim, generator=generator, dtype=torch.float64) * scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha})"


class _Translations(LieGroup):
    """T(d): exp(a) = [[I, a], [0, 1]]; pairs are x_u - x_v; no orbit coordinate."""

    q_dim = 0

    def exp(self, a: torch.Tensor) -> torch.Tensor:
        d = self.lie_dim
        g = torch.eye(d + 1, dtype=a.dtype, device=a.device).expand(*a.shape[:-1], d + 1, d + 1).clone()
        g[..., :d, d] = a
        return g

    def log(self, g: torch.Tensor) -> torch.Tensor:
        return g[..., : self.lie_dim, self.lie_dim]

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        out = g.clone()
        out[..., : self.lie_dim, self.lie_dim] = -g[..., : self.lie_dim, self.lie_dim]
        return out

    def lift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.new_zeros(*x.shape[:-1], 0)

    def pair_log(self, a_u: torch.Tensor, a_v: torch.Tensor) -> torch.Tensor:
        return a_u - a_v  # abelian: log(exp(-b) exp(a)) = a - b

    def distance_from_pair(self, pair: torch.Tensor, q_u: torch.Tensor, q_v: torch.Tensor) -> torch.Tensor:
        return pair.norm(dim=-1)  # a metric in x itself; α only rescales it, so it is dropped (EquivCNP code: T(k))

    def act(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + a.to(x)


class T1(_Translations):
    name, x_dim, lie_dim, mat_dim = "T1", 1, 1, 2


class T2(_Translations):
    name, x_dim, lie_dim, mat_dim = "T2", 2, 2, 3


class SO2(LieGroup):
    """Rotations of R^2 about the origin. Lift: a = θ = atan2(y, x), orbit q = r = ‖x‖."""

    name, x_dim, lie_dim, q_dim, mat_dim = "SO2", 2, 1, 1, 2

    def exp(self, a: torch.Tensor) -> torch.Tensor:
        return _rot(a[..., 0])

    def log(self, g: torch.Tensor) -> torch.Tensor:
        return torch.atan2(g[..., 1, 0] - g[..., 0, 1], g[..., 0, 0] + g[..., 1, 1])[..., None]

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        return g.transpose(-1, -2)

    def lift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return torch.atan2(x[..., 1:2], x[..., 0:1]), r

    def pair_log(self, a_u: torch.Tensor, a_v: torch.Tensor) -> torch.Tensor:
        return wrap_angle(a_u - a_v)

    def distance_from_pair(self, pair: torch.Tensor, q_u: torch.Tensor, q_v: torch.Tensor) -> torch.Tensor:
        # EquivCNP's SO(2) distance: angular part plus a relative radial part
        rel = (q_u - q_v).abs()[..., 0] / (q_u + q_v + 1e-3)[..., 0]
        return self.alpha * pair.abs()[..., 0] + (1 - self.alpha) * rel

    def act(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x @ _rot(a[0].to(x)).T

    def random_element(self, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        return (torch.rand(1, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi


class RxSO2(LieGroup):
    """Rotation-scalings of R^2 about the origin, a = (log r, θ); acts freely and transitively on R^2 \\ {0}."""

    name, x_dim, lie_dim, q_dim, mat_dim = "RxSO2", 2, 2, 0, 2

    def exp(self, a: torch.Tensor) -> torch.Tensor:
        return torch.exp(a[..., 0])[..., None, None] * _rot(a[..., 1])

    def log(self, g: torch.Tensor) -> torch.Tensor:
        rsin = (g[..., 1, 0] - g[..., 0, 1]) / 2
        rcos = (g[..., 0, 0] + g[..., 1, 1]) / 2
        log_r = 0.5 * torch.log(rsin * rsin + rcos * rcos)
        return torch.stack([log_r, torch.atan2(rsin, rcos)], dim=-1)

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        det = g[..., 0, 0] * g[..., 1, 1] - g[..., 0, 1] * g[..., 1, 0]
        return g.transpose(-1, -2) / det[..., None, None]

    def lift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return torch.cat([torch.log(r), torch.atan2(x[..., 1:2], x[..., 0:1])], -1), x.new_zeros(*x.shape[:-1], 0)

    def pair_log(self, a_u: torch.Tensor, a_v: torch.Tensor) -> torch.Tensor:
        d = a_u - a_v
        return torch.cat([d[..., :1], wrap_angle(d[..., 1:])], -1)

    def distance_from_pair(self, pair: torch.Tensor, q_u: torch.Tensor, q_v: torch.Tensor) -> torch.Tensor:
        return self.alpha * pair[..., 1].abs() + (1 - self.alpha) * pair[..., 0].abs()

    def act(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x @ self.exp(a.to(x)).T

    def random_element(self, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        log_s = torch.randn(1, generator=generator, dtype=torch.float64) * 0.5 * scale
        theta = (torch.rand(1, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
        return torch.cat([log_s, theta])


class SE2(LieGroup):
    """Rigid motions of R^2, a = (θ, t_x, t_y) (EquivCNP's basis order); exp(a) = [[R(θ), V t], [0, 1]],
    V = sinc θ · I + θ cosc θ · K with K = [[0, -1], [1, 0]]."""

    name, x_dim, lie_dim, q_dim, mat_dim = "SE2", 2, 3, 0, 3

    def exp(self, a: torch.Tensor) -> torch.Tensor:
        theta, t = a[..., 0], a[..., 1:]
        s, c = sinc(theta), theta * cosc(theta)
        vt = torch.stack([s * t[..., 0] - c * t[..., 1], c * t[..., 0] + s * t[..., 1]], -1)
        g = torch.zeros(*a.shape[:-1], 3, 3, dtype=a.dtype, device=a.device)
        g[..., :2, :2] = _rot(theta)
        g[..., :2, 2] = vt
        g[..., 2, 2] = 1
        return g

    def log(self, g: torch.Tensor) -> torch.Tensor:
        theta = torch.atan2(g[..., 1, 0] - g[..., 0, 1], g[..., 0, 0] + g[..., 1, 1])
        # V^{-1} = (sinc θ / (2 cosc θ)) I - (θ/2) K; sinc/(2 cosc) -> 1 as θ -> 0 (Taylor branches inside)
        a = sinc(theta) / (2 * cosc(theta))
        b = theta / 2
        tx, ty = g[..., 0, 2], g[..., 1, 2]
        return torch.stack([theta, a * tx + b * ty, -b * tx + a * ty], -1)

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        rt = g[..., :2, :2].transpose(-1, -2)
        out = torch.zeros_like(g)
        out[..., :2, :2] = rt
        out[..., :2, 2] = -(rt @ g[..., :2, 2:3])[..., 0]
        out[..., 2, 2] = 1
        return out

    def lift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-point lift T(x) R(0) (used only for illustration; `pairs` lifts pairs, see module docstring)."""
        theta = x.new_zeros(*x.shape[:-1], 1)
        return torch.cat([theta, x], -1), x.new_zeros(*x.shape[:-1], 0)

    def _element(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Matrix of T(x) R(β)."""
        g = torch.zeros(*x.shape[:-1], 3, 3, dtype=x.dtype, device=x.device)
        g[..., :2, :2] = _rot(beta)
        g[..., :2, 2] = x
        g[..., 2, 2] = 1
        return g

    def pairs(self, x_u: torch.Tensor, x_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_u, x_v = torch.broadcast_tensors(x_u, x_v)
        delta = x_u - x_v
        beta = torch.atan2(delta[..., 1], delta[..., 0])  # stabiliser aligned with the pair (module docstring)
        u, v = self._element(x_u, beta), self._element(x_v, beta)
        # v^{-1} u = T(R(-β)(x_u - x_v)): computed through the group maps rather than written down in closed form
        pair = self.log(self.compose(self.inverse(v), u))
        return pair, self.alpha * pair[..., :1].abs()[..., 0] + (1 - self.alpha) * pair[..., 1:].norm(dim=-1)

    def distance(self, x_u: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
        # equals `pairs(...)[1]` (θ part is 0 by construction) without building (..., 3, 3) matrices for every pair
        return (1 - self.alpha) * (x_u - x_v).norm(dim=-1)

    def act(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = self.exp(a.to(x))
        return x @ g[:2, :2].T + g[:2, 2]

    def random_element(self, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        theta = (torch.rand(1, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
        return torch.cat([theta, torch.randn(2, generator=generator, dtype=torch.float64) * scale])


GROUPS: dict[str, type[LieGroup]] = {"T1": T1, "T2": T2, "SO2": SO2, "RxSO2": RxSO2, "SE2": SE2}


def get_group(name: str, alpha: float = 0.3) -> LieGroup:
    """Instantiate a group by name (`"T1"`, `"T2"`, `"SO2"`, `"RxSO2"`, `"SE2"`)."""
    if name not in GROUPS:
        raise ValueError(f"unknown group {name!r}; choose one of {sorted(GROUPS)}")
    return GROUPS[name](alpha=alpha)
