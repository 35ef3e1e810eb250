"""Lie groups: axioms, exp∘log, Taylor branches, invariance of pairs/distances, action homomorphism."""

from __future__ import annotations

import math

import pytest
import torch

from hf_koopman.models.equivcnp.groups import GROUPS, SE2, cosc, get_group, sinc, wrap_angle

ALL = sorted(GROUPS)


def _random_algebra(group, n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, group.lie_dim, generator=gen, dtype=torch.float64)
    if group.name in ("SO2",):
        a = a.clamp(-3.0, 3.0)
    if group.name == "RxSO2":
        a[:, 1] = a[:, 1].clamp(-3.0, 3.0)
    if group.name == "SE2":
        a[:, 0] = a[:, 0].clamp(-3.0, 3.0)
    return a


@pytest.mark.parametrize("name", ALL)
def test_exp_log_roundtrip_and_axioms(name):
    group = get_group(name)
    gen = torch.Generator().manual_seed(1)
    a = _random_algebra(group, 64, gen)
    g = group.exp(a)
    assert g.shape == (64, group.mat_dim, group.mat_dim)
    torch.testing.assert_close(group.log(g), a, atol=1e-9, rtol=1e-9)  # log∘exp = id on the principal branch
    torch.testing.assert_close(group.exp(group.log(g)), g, atol=1e-9, rtol=1e-9)  # exp∘log = id
    h = group.exp(_random_algebra(group, 64, gen))
    k = group.exp(_random_algebra(group, 64, gen))
    e = group.identity(64, dtype=torch.float64)
    torch.testing.assert_close(group.compose(group.compose(g, h), k), group.compose(g, group.compose(h, k)))  # associativity
    torch.testing.assert_close(group.compose(g, e), g)  # identity
    torch.testing.assert_close(group.compose(g, group.inverse(g)), e, atol=1e-12, rtol=0)  # inverse
    torch.testing.assert_close(group.inverse(g), torch.linalg.inv(g))
    torch.testing.assert_close(group.exp(torch.zeros(1, group.lie_dim, dtype=torch.float64)), e[:1])


@pytest.mark.parametrize("name", ALL)
def test_action_is_a_homomorphism_and_pairs_are_invariant(name):
    group = get_group(name)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, group.x_dim, generator=gen, dtype=torch.float64)
    a, b = group.random_element(gen), group.random_element(gen)
    ab = group.log(group.compose(group.exp(a), group.exp(b)))
    torch.testing.assert_close(group.act(ab, x), group.act(a, group.act(b, x)))
    emb, dist = group.pairs(x[:, None], x[None])
    emb2, dist2 = group.pairs(group.act(a, x)[:, None], group.act(a, x)[None])
    assert emb.shape == (30, 30, group.embed_dim) and dist.shape == (30, 30)
    torch.testing.assert_close(emb2, emb, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(dist2, dist, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(group.distance(x[:, None], x[None]), dist)
    assert torch.all(dist.diagonal() < 1e-9) and torch.all(dist >= 0)


def test_pairs_detect_non_group_motions():
    """Negative control: pairs are *not* invariant under transformations outside the group."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    rot = get_group("SO2")
    shift = torch.tensor([0.4, -0.2], dtype=torch.float64)
    for name, moved in (("T2", rot.act(torch.tensor([1.0], dtype=torch.float64), x)), ("SO2", x + shift), ("RxSO2", x + shift)):
        g = get_group(name)
        assert (g.pairs(moved[:, None], moved[None])[0] - g.pairs(x[:, None], x[None])[0]).abs().max() > 1e-2, name
    se2, rxso2 = get_group("SE2"), get_group("RxSO2")
    assert (se2.pairs(2 * x[:, None], 2 * x[None])[1] - se2.pairs(x[:, None], x[None])[1]).abs().max() > 1e-2
    torch.testing.assert_close(rxso2.pairs(2 * x[:, None], 2 * x[None])[1], rxso2.pairs(x[:, None], x[None])[1])


def test_taylor_branches_match_closed_forms():
    x = torch.tensor([0.0, 1e-8, 1e-4, 0.03, 0.069, 0.071, 0.5, 2.0], dtype=torch.float64)
    safe = torch.where(x == 0, torch.ones_like(x), x)
    ref_sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(safe) / safe)
    ref_cosc = torch.where(x == 0, torch.full_like(x, 0.5), 2 * torch.sin(safe / 2) ** 2 / safe**2)  # stable form
    torch.testing.assert_close(sinc(x), ref_sinc, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cosc(x), ref_cosc, atol=1e-10, rtol=1e-10)
    # float32 near 0: finite, smooth, and gradients exist (the closed form would give 0/0)
    t = torch.tensor([0.0, 1e-6, 1e-3], requires_grad=True)
    (sinc(t) + cosc(t)).sum().backward()
    assert torch.isfinite(t.grad).all()
    se2 = SE2()
    a = torch.tensor([[1e-7, 0.3, -0.2], [0.0, 1.0, 2.0]], dtype=torch.float32)
    torch.testing.assert_close(se2.log(se2.exp(a)), a, atol=1e-6, rtol=1e-6)


def test_wrap_and_singular_origin():
    torch.testing.assert_close(wrap_angle(torch.tensor([3 * math.pi / 2, -3 * math.pi / 2])), torch.tensor([-math.pi / 2, math.pi / 2]))
    for name in ("SO2", "RxSO2"):
        emb, dist = get_group(name).pairs(torch.zeros(1, 1, 2), torch.tensor([[[0.0, 0.0], [0.1, 0.2]]]))
        assert torch.isfinite(emb).all() and torch.isfinite(dist).all(), name


def test_bad_group_and_alpha():
    with pytest.raises(ValueError, match="unknown group"):
        get_group("SO3")
    with pytest.raises(ValueError, match="alpha"):
        get_group("SO2", alpha=0.0)
