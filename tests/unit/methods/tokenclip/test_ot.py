"""Tests of clipad.ot against independent references: a slow float64 Sinkhorn written with
explicit Python loops over entries, the exact linear program (scipy.optimize.linprog) as
eps -> 0, finite differences (gradcheck), and a per-row sort for the top-k mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from clipad.methods.tokenclip import ot
from clipad.errors import UnknownNameError

# --------------------------------------------------------------------------- references


def slow_sinkhorn(C: np.ndarray, a: np.ndarray, b: np.ndarray, eps: float, tol: float = 1e-14, max_iter: int = 200_000):
    """Textbook Sinkhorn in float64, standard domain, one entry at a time.

    C: [N, K], a: [N], b: [K]. Returns (P [N, K], u [N], v [K]) with P_ij = u_i exp(-C_ij/eps) v_j.
    Needs exp(-max C / eps) to stay a normal float64 (eps >~ max C / 700).
    """
    N, K = C.shape
    kern = [[math.exp(-float(C[i, j]) / eps) for j in range(K)] for i in range(N)]
    u, v = [1.0] * N, [1.0] * K
    for _ in range(max_iter):
        for i in range(N):
            u[i] = float(a[i]) / sum(kern[i][j] * v[j] for j in range(K))
        for j in range(K):
            v[j] = float(b[j]) / sum(kern[i][j] * u[i] for i in range(N))
        rows = [sum(u[i] * kern[i][j] * v[j] for j in range(K)) for i in range(N)]
        if sum(abs(rows[i] - float(a[i])) for i in range(N)) < tol:
            break
    else:
        raise AssertionError("reference Sinkhorn did not converge")
    P = np.array([[u[i] * kern[i][j] * v[j] for j in range(K)] for i in range(N)])
    return P, np.array(u), np.array(v)


def lp_optimum(C: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """min <P, C> over {P >= 0, P 1 = a, P^T 1 = b}: the eps -> 0 limit."""
    N, K = C.shape
    A_eq = np.zeros((N + K, N * K))
    for i in range(N):
        A_eq[i, i * K : (i + 1) * K] = 1.0  # row sums
    for j in range(K):
        A_eq[N + j, j::K] = 1.0  # column sums
    res = linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


def entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(p)).sum())


def random_problem(B: int, N: int, K: int, seed: int, dtype=torch.float64, uniform: bool = False):
    """cost [B, N, K] in [0, 2] (as 1 - cos), marginals a [B, N], b [B, K] positive, equal totals."""
    g = torch.Generator().manual_seed(seed)
    cost = (2 * torch.rand(B, N, K, generator=g, dtype=torch.float64)).to(dtype)
    if uniform:
        return cost, torch.full((B, N), 1 / N, dtype=dtype), torch.full((B, K), 1 / K, dtype=dtype)
    a = torch.rand(B, N, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(B, K, generator=g, dtype=torch.float64) + 0.2
    return cost, (a / a.sum(-1, keepdim=True)).to(dtype), (b / b.sum(-1, keepdim=True)).to(dtype)


def assert_marginals(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    p = plan.double()
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert (p.sum(-1) - a.double()).abs().max() <= atol
    assert (p.sum(-2) - b.double()).abs().max() <= atol


# --------------------------------------------------------------------------- sinkhorn: marginals


@pytest.mark.parametrize(
    "eps, dtype, max_iter",
    [
        (0.1, torch.float32, 2_000),
        (0.05, torch.float32, 2_000),
        (0.01, torch.float32, 20_000),
        (1e-3, torch.float32, 60_000),
        (0.05, torch.float64, 2_000),
        (1e-3, torch.float64, 60_000),
    ],
)
def test_marginals_random_costs_nonuniform(eps, dtype, max_iter):
    cost, a, b = random_problem(3, 7, 4, seed=1, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-8  # float32's floor is a few 1e-7
    res = ot.sinkhorn(cost, epsilon=eps, a=a, b=b, max_iter=max_iter, tol=tol)
    assert res.n_iter < max_iter, "did not converge"
    assert_marginals(res.plan, a, b, atol=1e-5)
    # marginal_error is what it says, per batch element
    p = res.plan.double()
    err = (p.sum(-1) - a.double()).abs().sum(-1) + (p.sum(-2) - b.double()).abs().sum(-1)
    torch.testing.assert_close(res.marginal_error.double(), err, atol=1e-6, rtol=0)
    assert res.plan.dtype == dtype and res.plan.shape == (3, 7, 4)


def test_marginals_eps_1e3_float32_stable():
    """eps = 1e-3 on costs in [0, 2], float32: potentials reach 2000 / eps-units, entries
    exp(-2000) underflow; the plan must stay finite and meet the marginals."""
    cost, a, b = random_problem(2, 6, 3, seed=2, dtype=torch.float32)
    # a strong column preference (all tokens cheapest at subspace 0) makes |g| / eps ~ 1900
    cost = cost * 0.05 + torch.linspace(0, 1.9, 3)
    short = ot.sinkhorn(cost, epsilon=1e-3, a=a, b=b, max_iter=10)
    assert torch.isfinite(short.plan).all() and torch.isfinite(short.log_plan).all()
    assert torch.isfinite(short.f).all() and torch.isfinite(short.g).all()
    res = ot.sinkhorn(cost, epsilon=1e-3, a=a, b=b, max_iter=30_000, tol=1e-6)
    assert res.n_iter < 30_000
    assert torch.isfinite(res.log_plan).all() and (res.log_plan <= 1e-6).all()
    assert_marginals(res.plan, a, b, atol=1e-5)


def test_large_problem_uniform_default_marginals():
    """TokenCLIP's shape and defaults: N = 1369 tokens, K = 8, eps = 0.05, uniform marginals."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.nn.functional.normalize(torch.randn(2, 1369, 16, generator=g), dim=-1)
    subspaces = torch.nn.functional.normalize(torch.randn(2, 8, 16, generator=g), dim=-1)
    cost = 1 - tokens @ subspaces.transpose(1, 2)
    res = ot.sinkhorn(cost, epsilon=0.05, max_iter=500)
    assert res.n_iter < 500
    assert_marginals(res.plan, torch.full((2, 1369), 1 / 1369), torch.full((2, 8), 1 / 8), atol=1e-5)
    assert (res.marginal_error < 1e-5).all()


# --------------------------------------------------------------------------- sinkhorn: references


@pytest.mark.parametrize("eps", [0.5, 0.1, 0.01])
@pytest.mark.parametrize("N, K", [(5, 3), (3, 6)])
def test_agrees_with_slow_reference_float64(eps, N, K):
    cost, a, b = random_problem(2, N, K, seed=10 + N, dtype=torch.float64)
    res = ot.sinkhorn(cost, epsilon=eps, a=a, b=b, max_iter=100_000, tol=1e-13)
    std = ot.sinkhorn(cost, epsilon=eps, a=a, b=b, max_iter=100_000, tol=1e-13, log_domain=False)
    for n in range(2):
        P, u, v = slow_sinkhorn(cost[n].numpy(), a[n].numpy(), b[n].numpy(), eps)
        np.testing.assert_allclose(res.plan[n].numpy(), P, atol=1e-9, rtol=0)
        np.testing.assert_allclose(std.plan[n].numpy(), P, atol=1e-9, rtol=0)
        # potentials are defined up to (f + c, g - c): compare the gauge-invariant sums
        ref_fg = eps * (np.log(u)[:, None] + np.log(v)[None, :])
        for r in (res, std):
            fg = (r.f[n][:, None] + r.g[n][None, :]).numpy()
            np.testing.assert_allclose(fg, ref_fg, atol=1e-8, rtol=0)
            np.testing.assert_allclose(r.log_plan[n].numpy(), np.log(P), atol=1e-7, rtol=0)


def test_agrees_with_slow_reference_float32():
    cost, a, b = random_problem(2, 5, 4, seed=21, dtype=torch.float64)
    res = ot.sinkhorn(cost.float(), epsilon=0.1, a=a.float(), b=b.float(), max_iter=5_000, tol=1e-7)
    for n in range(2):
        P, _, _ = slow_sinkhorn(cost[n].numpy(), a[n].numpy(), b[n].numpy(), 0.1)
        np.testing.assert_allclose(res.plan[n].double().numpy(), P, atol=1e-5, rtol=0)


def test_potentials_describe_the_plan():
    """P_ij = exp((f_i + g_j - C_ij) / eps) with f in the original cost's units (row shift undone)."""
    cost, a, b = random_problem(2, 6, 4, seed=4, dtype=torch.float64)
    cost = cost + torch.arange(6, dtype=torch.float64)[None, :, None]  # row offsets, absorbed by f
    res = ot.sinkhorn(cost, epsilon=0.05, a=a, b=b, max_iter=10_000, tol=1e-12)
    rebuilt = (res.f[:, :, None] + res.g[:, None, :] - cost) / 0.05
    torch.testing.assert_close(rebuilt, res.log_plan, atol=1e-8, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_small_eps_approaches_linear_program(seed):
    """0 <= <P_eps, C> - OPT <= eps * min(H(a), H(b)) (entropic bound), and <P_eps, C> is
    nondecreasing in eps; OPT from scipy's LP solver."""
    N, K = 6, 4
    cost, a, b = random_problem(1, N, K, seed=30 + seed, dtype=torch.float64)
    C, an, bn = cost[0].numpy(), a[0].numpy(), b[0].numpy()
    opt = lp_optimum(C, an, bn)
    bound_h = min(entropy(an), entropy(bn))
    values = []
    for eps in (0.1, 0.03, 0.01, 3e-3, 1e-3):
        res = ot.sinkhorn(cost, epsilon=eps, a=a, b=b, max_iter=200_000, tol=1e-10)
        assert res.n_iter < 200_000
        value = float((res.plan[0] * cost[0]).sum())
        slack = 2.0 * float(res.marginal_error[0]) + 1e-12  # a plan off the polytope by that mass
        assert -slack <= value - opt <= eps * bound_h + slack, (eps, value, opt)
        values.append(value)
    assert all(x >= y - 1e-9 for x, y in zip(values, values[1:]))
    assert values[-1] - opt < 1e-3 * bound_h + 1e-9


def test_large_eps_tends_to_independent_coupling():
    cost, a, b = random_problem(2, 5, 3, seed=5, dtype=torch.float64)
    res = ot.sinkhorn(cost, epsilon=1e4, a=a, b=b)
    torch.testing.assert_close(res.plan, a[:, :, None] * b[:, None, :], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- sinkhorn: batching


def test_batch_equals_separate_solves():
    cost, a, b = random_problem(4, 9, 5, seed=6, dtype=torch.float64)
    res = ot.sinkhorn(cost, epsilon=0.05, a=a, b=b, max_iter=300, tol=0.0)
    assert res.n_iter == 300
    for n in range(4):
        one = ot.sinkhorn(cost[n : n + 1], epsilon=0.05, a=a[n : n + 1], b=b[n : n + 1], max_iter=300, tol=0.0)
        torch.testing.assert_close(res.plan[n : n + 1], one.plan, atol=1e-12, rtol=0)
        torch.testing.assert_close(res.f[n : n + 1], one.f, atol=1e-10, rtol=0)
        torch.testing.assert_close(res.marginal_error[n : n + 1], one.marginal_error, atol=1e-12, rtol=0)
    # converged solves agree too even though the batch runs until its slowest element is done
    conv = ot.sinkhorn(cost, epsilon=0.05, a=a, b=b, max_iter=5_000, tol=1e-12)
    for n in range(4):
        one = ot.sinkhorn(cost[n : n + 1], epsilon=0.05, a=a[n : n + 1], b=b[n : n + 1], max_iter=5_000, tol=1e-12)
        torch.testing.assert_close(conv.plan[n : n + 1], one.plan, atol=1e-10, rtol=0)


def test_shared_marginals_broadcast_and_defaults_uniform():
    cost, a, b = random_problem(3, 6, 4, seed=7, dtype=torch.float64)
    shared = ot.sinkhorn(cost, epsilon=0.1, a=a[0], b=b[0], max_iter=1000)
    expanded = ot.sinkhorn(cost, epsilon=0.1, a=a[0].expand(3, -1), b=b[0].expand(3, -1), max_iter=1000)
    torch.testing.assert_close(shared.plan, expanded.plan, atol=0, rtol=0)
    default = ot.sinkhorn(cost, epsilon=0.1, max_iter=1000)
    uniform = ot.sinkhorn(cost, epsilon=0.1, a=torch.full((6,), 1 / 6, dtype=torch.float64), b=torch.full((4,), 0.25, dtype=torch.float64), max_iter=1000)
    torch.testing.assert_close(default.plan, uniform.plan, atol=1e-15, rtol=0)


def test_stopping_rule():
    cost, a, b = random_problem(2, 8, 3, seed=8, dtype=torch.float64)
    fixed = ot.sinkhorn(cost, epsilon=0.2, a=a, b=b, max_iter=37, tol=0.0)
    assert fixed.n_iter == 37
    res = ot.sinkhorn(cost, epsilon=0.2, a=a, b=b, max_iter=10_000, tol=1e-9)
    assert 1 <= res.n_iter < 10_000 and (res.marginal_error < 1e-9).all()
    # one iteration fewer was not converged: it stopped at the first iteration that was
    prev = ot.sinkhorn(cost, epsilon=0.2, a=a, b=b, max_iter=res.n_iter - 1, tol=0.0)
    assert prev.marginal_error.max() >= 1e-9
    sparse = ot.sinkhorn(cost, epsilon=0.2, a=a, b=b, max_iter=10_000, tol=1e-9, check_every=7)
    assert sparse.n_iter % 7 == 0 and res.n_iter <= sparse.n_iter < res.n_iter + 7
    assert (sparse.marginal_error < 1e-9).all()


def test_degenerate_sizes_and_numpy_scalars():
    cost, a, _ = random_problem(2, 5, 1, seed=16, dtype=torch.float64)
    one_subspace = ot.sinkhorn(cost, epsilon=np.float32(0.1), a=a, b=torch.ones(1, dtype=torch.float64), max_iter=np.int64(10))
    torch.testing.assert_close(one_subspace.plan, a[:, :, None], atol=1e-12, rtol=0)  # all mass to it
    cost, _, b = random_problem(2, 1, 4, seed=17, dtype=torch.float64)
    one_token = ot.sinkhorn(cost, epsilon=0.1, a=torch.ones(1, dtype=torch.float64), b=b)
    torch.testing.assert_close(one_token.plan, b[:, None, :], atol=1e-12, rtol=0)
    assert (ot.topk_mask(one_token.plan, np.int64(2)) > 0).sum() == 4


def test_dtypes():
    cost, _, _ = random_problem(2, 6, 4, seed=9, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        res = ot.sinkhorn(cost.to(dtype), epsilon=0.1, max_iter=1000)
        assert res.plan.dtype == dtype and res.log_plan.dtype == dtype
        assert res.f.dtype == torch.float32
        assert_marginals(res.plan.float(), torch.full((2, 6), 1 / 6), torch.full((2, 4), 0.25), atol=2e-3)
    assert ot.sinkhorn(cost.double(), epsilon=0.1).plan.dtype == torch.float64


def test_standard_domain_underflow_raises():
    cost = torch.zeros(1, 4, 2)
    cost[..., 1] = 2.0  # exp(-2 / 1e-3) = 0 empties column 1 of the kernel
    with pytest.raises(FloatingPointError, match="log_domain=True"):
        ot.sinkhorn(cost, epsilon=1e-3, log_domain=False)
    res = ot.sinkhorn(cost, epsilon=1e-3, max_iter=100)  # the log domain solves it
    assert_marginals(res.plan, torch.full((1, 4), 0.25), torch.full((1, 2), 0.5), atol=1e-6)


# --------------------------------------------------------------------------- sinkhorn: gradients


@pytest.mark.parametrize("log_domain", [True, False])
def test_gradcheck_unrolled(log_domain):
    cost, a, b = random_problem(2, 3, 2, seed=11, dtype=torch.float64)
    cost.requires_grad_(True)

    def fn(c):
        # a fixed number of iterations (tol=0) so that the function is one smooth composition
        r = ot.sinkhorn(c, epsilon=0.3, a=a, b=b, max_iter=200, tol=0.0, grad="unrolled", log_domain=log_domain)
        return r.plan, r.f

    assert torch.autograd.gradcheck(fn, (cost,), eps=1e-6, atol=1e-6)


def test_unrolled_gradient_matches_implicit_derivative():
    """At convergence d<P, W>/dC from unrolling equals the derivative through the fixed point,
    computed here independently by finite differences of fully converged float64 solves."""
    cost, a, b = random_problem(1, 4, 3, seed=12, dtype=torch.float64)
    w = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = cost.clone().requires_grad_(True)
    (ot.sinkhorn(c, epsilon=0.2, a=a, b=b, max_iter=2000, tol=1e-13, grad="unrolled").plan * w).sum().backward()
    h = 1e-6
    fd = torch.zeros_like(cost)
    for idx in np.ndindex(*cost.shape):
        cp, cm = cost.clone(), cost.clone()
        cp[idx] += h
        cm[idx] -= h
        vp = (ot.sinkhorn(cp, epsilon=0.2, a=a, b=b, max_iter=5000, tol=1e-14).plan * w).sum()
        vm = (ot.sinkhorn(cm, epsilon=0.2, a=a, b=b, max_iter=5000, tol=1e-14).plan * w).sum()
        fd[idx] = (vp - vm) / (2 * h)
    torch.testing.assert_close(c.grad, fd, atol=1e-6, rtol=1e-5)


def test_grad_none_is_detached_and_same_values():
    cost, _, _ = random_problem(2, 5, 3, seed=13, dtype=torch.float64)
    c = cost.clone().requires_grad_(True)
    none = ot.sinkhorn(c, epsilon=0.1, max_iter=500)
    for t in (none.plan, none.log_plan, none.f, none.g, none.marginal_error):
        assert t.grad_fn is None and not t.requires_grad
    unrolled = ot.sinkhorn(c, epsilon=0.1, max_iter=500, grad="unrolled")
    assert unrolled.plan.grad_fn is not None
    torch.testing.assert_close(none.plan, unrolled.plan.detach(), atol=0, rtol=0)


# --------------------------------------------------------------------------- top-k, helpers


def slow_topk(plan: np.ndarray, k: int) -> np.ndarray:
    """Per row: keep the k largest (no ties in the input), renormalise."""
    out = np.zeros_like(plan)
    for idx in np.ndindex(*plan.shape[:-1]):
        row = plan[idx]
        keep = np.argsort(-row)[:k]
        out[idx][keep] = row[keep] / row[keep].sum()
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_topk_matches_slow_reference(k):
    cost, _, _ = random_problem(3, 10, 5, seed=14, dtype=torch.float64)
    plan = ot.sinkhorn(cost, epsilon=0.1, max_iter=500).plan
    out = ot.topk_mask(plan, k)
    np.testing.assert_allclose(out.numpy(), slow_topk(plan.numpy(), min(k, 5)), atol=1e-15, rtol=1e-12)
    kept = out > 0
    assert (kept.sum(-1) == min(k, 5)).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 10, dtype=torch.float64))
    # the kept entries are the k largest of the row
    big = torch.where(kept, plan, torch.full_like(plan, math.inf)).amin(-1)
    small = torch.where(kept, torch.full_like(plan, -math.inf), plan).amax(-1)
    assert (big >= small).all()
    raw = ot.topk_mask(plan, k, renormalize=False)
    torch.testing.assert_close(raw, torch.where(kept, plan, torch.zeros_like(plan)), atol=0, rtol=0)


def test_topk_exactly_k_with_ties():
    uniform = torch.full((2, 7, 6), 1 / 42)
    for k in range(1, 7):
        out = ot.topk_mask(uniform, k)
        assert ((out > 0).sum(-1) == k).all()
        torch.testing.assert_close(out[out > 0], torch.full(((2 * 7 * k),), 1 / k))
    # a plan with repeated values inside each row
    tied = torch.tensor([[[0.3, 0.3, 0.3, 0.1], [0.2, 0.2, 0.4, 0.2]]])
    out = ot.topk_mask(tied, 2)
    assert ((out > 0).sum(-1) == 2).all()
    assert out[0, 1, 2] == pytest.approx(0.4 / 0.6)


def test_topk_dense_and_zero_rows():
    plan = torch.rand(2, 4, 3)
    torch.testing.assert_close(ot.topk_mask(plan, 3), plan / plan.sum(-1, keepdim=True))
    torch.testing.assert_close(ot.topk_mask(plan, 10), plan / plan.sum(-1, keepdim=True))
    torch.testing.assert_close(ot.topk_mask(plan, 10, renormalize=False), plan, atol=0, rtol=0)
    plan[0, 1] = 0.0
    out = ot.topk_mask(plan, 2)
    assert torch.isfinite(out).all() and (out[0, 1] == 0).all()


def test_topk_gradient_reaches_kept_entries_only():
    plan = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]], requires_grad=True)
    ot.topk_mask(plan, 2, renormalize=False).sum().backward()
    assert plan.grad.tolist() == [[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]]


def test_row_normalize():
    x = torch.rand(3, 5, 4)
    x[1, 2] = 0.0
    out = ot.row_normalize(x)
    np.testing.assert_allclose(out[0].numpy(), (x[0] / x[0].sum(-1, keepdim=True)).numpy(), rtol=1e-6)
    sums = out.sum(-1)
    sums[1, 2] += 1.0  # the zero row stays zero
    torch.testing.assert_close(sums, torch.ones(3, 5))
    # an OT plan with uniform token masses: row_normalize = N * plan
    plan = ot.sinkhorn(torch.rand(2, 5, 3, dtype=torch.float64), epsilon=0.1, max_iter=2000, tol=1e-12).plan
    torch.testing.assert_close(ot.row_normalize(plan), 5 * plan, atol=1e-11, rtol=0)


def test_softmax_assignment():
    cost, a, _ = random_problem(2, 6, 4, seed=15, dtype=torch.float64)
    T = 0.07
    out = ot.softmax_assignment(cost, temperature=T)
    e = np.exp(-cost.numpy() / T)
    np.testing.assert_allclose(out.numpy(), e / e.sum(-1, keepdims=True), rtol=1e-12)
    # It is the OT plan for the subspace masses it implies: with b = sum_i a_i softmax_i, the
    # plan diag(a) softmax has Sinkhorn's form (g = 0) and both marginals, so it is the solution.
    b = (a[:, :, None] * out).sum(1)
    plan = ot.sinkhorn(cost, epsilon=T, a=a, b=b, max_iter=5000, tol=1e-13).plan
    torch.testing.assert_close(ot.row_normalize(plan), out, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cost=torch.rand(4, 3)), r"cost must have shape \[B, N, K\].*cost\[None\]"),
        (dict(cost=torch.ones(2, 4, 3, dtype=torch.long)), "cost must be a floating-point"),
        (dict(cost=torch.rand(2, 0, 3)), "non-empty"),
        (dict(cost=torch.tensor([[[0.0, math.nan]]])), "cost has non-finite"),
        (dict(epsilon=0.0), "epsilon must be"),
        (dict(epsilon=-0.1), "epsilon must be"),
        (dict(epsilon=math.nan), "epsilon must be"),
        (dict(a=torch.full((5,), 0.2)), r"a must have shape \[N\]"),
        (dict(a=torch.full((3, 4), 0.25)), r"a must have shape"),
        (dict(b=torch.full((4,), 0.25)), r"b must have shape \[K\]"),
        (dict(a=torch.tensor([0.5, 0.5, 0.0, 0.0])), "a must be finite and strictly positive"),
        (dict(b=torch.tensor([1.5, -0.5, 0.0])), "b must be finite and strictly positive"),
        (dict(a=torch.full((4,), 0.5)), "a and b must have the same total mass"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=-1.0), "tol"),
        (dict(check_every=0), "check_every"),
    ],
)
def test_sinkhorn_errors(kwargs, match):
    args = dict(cost=torch.rand(2, 4, 3), epsilon=0.1)
    args.update(kwargs)
    cost = args.pop("cost")
    with pytest.raises(ValueError, match=match):
        ot.sinkhorn(cost, **args)


def test_other_errors():
    with pytest.raises(UnknownNameError, match="grad='implicit'"):
        ot.sinkhorn(torch.rand(1, 3, 2), epsilon=0.1, grad="implicit")
    with pytest.raises(TypeError, match="cost must be a torch.Tensor"):
        ot.sinkhorn(np.random.rand(1, 3, 2), epsilon=0.1)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        ot.topk_mask(torch.rand(1, 3, 2), 0)
    with pytest.raises(ValueError, match="temperature must be"):
        ot.softmax_assignment(torch.rand(1, 3, 2), temperature=0.0)
