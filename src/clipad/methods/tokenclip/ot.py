"""Entropic optimal transport between visual tokens and textual subspaces (pure tensor functions).

TokenCLIP transports the N visual tokens of each image to K learnable textual subspaces under a
cost built from cross-modal similarity (e.g. ``1 - cos``, in [0, 2]), then keeps each token's
top-k plan entries::

    >>> import torch
    >>> from clipad import ot
    >>> cost = torch.rand(2, 6, 3) * 2                      # [B, N, K]
    >>> res = ot.sinkhorn(cost, epsilon=0.05, max_iter=1000)
    >>> res.plan.shape, bool((res.marginal_error < 1e-5).all())
    (torch.Size([2, 6, 3]), True)
    >>> assign = ot.topk_mask(res.plan, k=2)                # rows: distributions over subspaces
    >>> torch.allclose(assign.sum(-1), torch.ones(2, 6)), int((assign[0, 0] > 0).sum())
    (True, 2)

Maths
-----
For one image with cost ``C: [N, K]`` and marginals ``a: [N]`` (token masses, default ``1/N``) and
``b: [K]`` (subspace masses, default ``1/K``), :func:`sinkhorn` solves::

    min_P  <P, C> - eps * H(P)    s.t.  P 1 = a,  P^T 1 = b,  P >= 0,   H(P) = -sum_ij P_ij log P_ij

Its solution has the form ``P_ij = exp((f_i + g_j - C_ij) / eps)`` for dual potentials ``f: [N]``
and ``g: [K]`` (in cost units), found by alternating exact block maximisations of the dual
(Sinkhorn's iterations), written with log-sum-exp::

    f_i = eps log a_i - eps LSE_j((g_j - C_ij) / eps)        (rows now sum to a)
    g_j = eps log b_j - eps LSE_i((f_i - C_ij) / eps)        (columns now sum to b)

starting from ``g = 0``. Each iteration is one ``f`` then one ``g`` update, so the returned plan
satisfies the column marginal to rounding and the row marginal to the reported error. As
``eps -> 0`` the plan tends to a solution of the linear program ``min <P, C>`` over the same
polytope, with ``0 <= <P, C> - OPT <= eps * min(H(a), H(b))`` for probability vectors ``a``,
``b``; as ``eps -> inf`` it tends to
``a b^T`` (every token spread over the subspaces in proportion to ``b``).

Convergence is measured by ``marginal_error``: the L1 violation ``||P 1 - a||_1 + ||P^T 1 - b||_1``
per batch element (a mass, so comparable across N and K). The loop stops after the first
iteration at which the row part (the column part is zero to rounding after a ``g``-update) has
its maximum over the batch below ``tol``, tested every ``check_every`` iterations, or after
``max_iter`` iterations; ``marginal_error`` is then recomputed from the returned plan.

Defaults and why
----------------
* ``epsilon`` has no default: its scale is the cost's. TokenCLIP's notes
  (``design/methods/tokenclip.md``) pick 0.05 on a ``1 - cos`` cost in [0, 2].
* ``max_iter=100``, ``tol=1e-6``: on TokenCLIP-sized problems (N = 1369 tokens, K = 8, costs in
  [0, 2]) at eps = 0.05 a float32 plan reaches 1e-6 in 50-100 iterations (small problems, N ~ 10,
  can take a few hundred); 1e-6 sits just above float32's floor (a few 1e-7; the returned error
  can exceed ``tol`` by that rounding). Sinkhorn slows down as eps shrinks, roughly like
  ``range(C) / eps``: eps = 0.01 takes hundreds to a thousand iterations, eps = 1e-3 thousands to
  tens of thousands, so raise ``max_iter`` there and read ``n_iter`` / ``marginal_error``.
* ``grad="none"``: the plan is computed under ``torch.no_grad`` and returned detached, a fixed
  assignment through which gradients do not flow (the usual choice in OT prompt learning, e.g.
  PLOT; the TokenCLIP notes choose it: gradients reach the prompts through the similarities the
  plan weights). ``grad="unrolled"`` back-propagates through every iteration, w.r.t. ``cost``
  (and ``a``, ``b``); memory grows with the number of iterations run (a few ``[B, N, K]``
  tensors each).
* ``log_domain=True``: see below. ``log_domain=False`` is the textbook multiplicative form on the
  kernel ``exp(-C / eps)`` (batched matrix-vector products), for large eps only.

Stability notes
---------------
* In the log domain nothing is exponentiated but ``log P`` (and row sums of ``P``), whose entries
  are at most ``log`` of the total mass once normalised, so nothing overflows for any eps > 0.
  Entries whose true value is below the dtype's smallest number (``exp(-2000)`` at eps = 1e-3)
  come out as exact zeros, as they should; ``log_plan`` keeps them finite.
* The iterations update ``log P`` in place of recomputing it from ``f`` and ``g`` each time. The
  potentials reach ``range(C) / eps`` (2000 at eps = 1e-3 on [0, 2]); recomputing
  ``(f + g - C) / eps`` from them rounds every plan entry by up to ~1e-4 relative in float32,
  which caps the marginals near 1e-5 on costs with a strong column preference. Updating
  ``log P`` keeps them near 1e-7. The price: ``log_plan`` and ``(f + g - C) / eps`` drift apart
  by accumulated rounding. On the plan's significant entries (``log P > -20``) in float32 that is
  ~2e-5 at eps = 0.05 and up to ~2e-2 at eps = 1e-3 after 25,000 iterations, while the plan stays
  within ~5e-6 in L1 of the float64 solution. ``f`` and ``g`` are summed with compensation (Kahan).
* Each row of the cost is shifted by its minimum before the iterations, an exact
  reparametrisation absorbed by ``f`` (the returned ``f`` is in the original cost's units): each
  row of the starting ``log P`` has a 0, so no row of the standard-domain kernel underflows
  entirely.
* float16 / bfloat16 costs are solved in float32 (log-sum-exp in half precision loses the
  marginals) and the plan is returned in the cost's dtype.
* The standard domain (``log_domain=False``) underflows once ``range(C) / eps`` exceeds about 87
  (float32) or 708 (float64) in a way that empties a row or column; :func:`sinkhorn` then raises
  ``FloatingPointError`` rather than return NaNs.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ...errors import InvalidTypeError, InvalidValueError, NumericalError, UnknownNameError

__all__ = ["OTResult", "row_normalize", "sinkhorn", "softmax_assignment", "topk_mask"]

_GRAD_MODES = ("none", "unrolled")


class OTResult(NamedTuple):
    """What :func:`sinkhorn` returns.

    plan: [B, N, K] the transport plan, ``P_ij = exp(log_plan_ij)``; rows sum to ``a``, columns to ``b``.
    log_plan: [B, N, K] ``(f_i + g_j - C_ij) / eps``, finite where ``plan`` underflows to 0.
    f: [B, N] row (token) potentials, in cost units.
    g: [B, K] column (subspace) potentials, in cost units.
    n_iter: number of Sinkhorn iterations run (one ``f`` and one ``g`` update each).
    marginal_error: [B] ``||P 1 - a||_1 + ||P^T 1 - b||_1`` of the returned plan.
    """

    plan: torch.Tensor
    log_plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor


def sinkhorn(
    cost: torch.Tensor,
    *,
    epsilon: float,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    log_domain: bool = True,
    grad: str = "none",
    check_every: int = 1,
) -> OTResult:
    """Batched entropic optimal transport (Sinkhorn), one problem per batch element.

    Args:
        cost: [B, N, K] float, finite; e.g. ``1 - cos(token, subspace)`` in [0, 2].
        epsilon: entropic regularisation, > 0, in the cost's units.
        a: [B, N] or [N] positive row (token) masses; default uniform ``1/N``.
        b: [B, K] or [K] positive column (subspace) masses; default uniform ``1/K``. Each batch
            element's ``a`` and ``b`` must have the same total (relative tolerance 1e-5).
        max_iter: most iterations, >= 1 (eps = 1e-3 can need tens of thousands; see above).
        tol: stop after the first iteration whose row error ``||P 1 - a||_1`` (the columns are
            exact after each iteration) is below ``tol`` in every batch element; 0 runs exactly
            ``max_iter`` iterations.
        log_domain: log-sum-exp updates (stable for any eps); False: multiplicative updates
            with ``exp(-C / eps)`` (raises if that under/overflows).
        grad: ``"none"`` (default): computed under ``no_grad``, results detached.
            ``"unrolled"``: autograd through the iterations, w.r.t. ``cost`` (and ``a``, ``b``).
        check_every: test convergence every this many iterations. Each test reads one number
            back to the host; on a GPU a value like 10 avoids a sync per iteration at the price
            of up to ``check_every - 1`` extra (harmless) iterations.

    Returns:
        :class:`OTResult` with ``plan: [B, N, K]``, ``log_plan``, ``f: [B, N]``, ``g: [B, K]``,
        ``n_iter``, ``marginal_error: [B]``, on ``cost``'s device; plan-shaped outputs in
        ``cost``'s dtype, the rest in the working dtype (float32 for half-precision costs).
    """
    if grad not in _GRAD_MODES:
        raise UnknownNameError(f"grad={grad!r} is not one of {_GRAD_MODES}")
    _check_int("max_iter", max_iter)
    _check_int("check_every", check_every)
    _check_real("epsilon", epsilon, positive=True)
    _check_real("tol", tol, positive=False)
    if not isinstance(cost, torch.Tensor):
        raise InvalidTypeError(f"cost must be a torch.Tensor [B, N, K], got {type(cost).__name__}; convert it with torch.as_tensor")
    out_dtype = cost.dtype
    cost, log_a, log_b = _check_problem(cost, a, b)
    args = (float(epsilon), int(max_iter), float(tol), bool(log_domain), int(check_every), out_dtype)
    if grad == "none":
        with torch.no_grad():
            return _solve(cost.detach(), log_a.detach(), log_b.detach(), *args)
    return _solve(cost, log_a, log_b, *args)


# torch._disable_dynamo: torch.compiler.disable, importing torch._dynamo (seconds) at the first call
# rather than at `import clipad.methods`
@torch._disable_dynamo  # data-dependent validation: run eagerly rather than as a graph break
def _check_problem(cost: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate; return (cost in the working dtype, log a: [B, N], log b: [B, K])."""
    if cost.dim() != 3:
        hint = " (add a batch dimension: cost[None])" if cost.dim() == 2 else ""
        raise InvalidValueError(f"cost must have shape [B, N, K], got {tuple(cost.shape)}{hint}")
    if not cost.is_floating_point():
        raise InvalidValueError(f"cost must be a floating-point tensor, got dtype {cost.dtype}; cast it, e.g. cost.float()")
    B, N, K = cost.shape
    if B == 0 or N == 0 or K == 0:
        raise InvalidValueError(f"cost must have non-empty dimensions [B, N, K], got {tuple(cost.shape)}")
    if not bool(torch.isfinite(cost).all()):
        raise InvalidValueError(f"cost has non-finite entries (NaN or inf): {int((~torch.isfinite(cost)).sum())} of them; replace them, e.g. torch.nan_to_num, first")
    # Half precision loses the marginals in log-sum-exp; float64 stays float64.
    work = torch.promote_types(cost.dtype, torch.float32)
    cost = cost.to(work)
    marg = []
    for name, m, n, dim in (("a", a, N, "N"), ("b", b, K, "K")):
        if m is None:
            # full_like, not full((B, n)): an ONNX export (a trace) keeps B as the input's size
            marg.append(torch.full_like(cost[..., 0] if name == "a" else cost[:, 0], 1.0 / n))
            continue
        m = torch.as_tensor(m, device=cost.device)
        if not m.is_floating_point():
            m = m.to(work)
        if m.dim() == 1:
            m = m.expand(B, -1)
        if m.shape != (B, n):
            raise InvalidValueError(f"{name} must have shape [{dim}]=({n},) or [B, {dim}]=({B}, {n}) for cost of shape {tuple(cost.shape)}, got {tuple(m.shape)}")
        if not bool((torch.isfinite(m) & (m > 0)).all()):
            raise InvalidValueError(f"{name} must be finite and strictly positive (masses of the {'tokens' if name == 'a' else 'subspaces'})")
        marg.append(m.to(work))
    sa, sb = marg[0].sum(-1), marg[1].sum(-1)
    if not torch.allclose(sa, sb, rtol=1e-5, atol=0.0):
        i = int((sa - sb).abs().argmax())
        raise InvalidValueError(f"a and b must have the same total mass per batch element: batch {i} has sum(a)={float(sa[i]):.6g}, sum(b)={float(sb[i]):.6g}; normalise both, e.g. a / a.sum(-1, keepdim=True)")
    return cost, marg[0].log(), marg[1].log()


def _check_int(name: str, x: object) -> None:
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 1:
        raise InvalidValueError(f"{name} must be an int >= 1, got {x!r}")


def _check_real(name: str, x: object, *, positive: bool) -> None:
    ok = isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 if positive else x >= 0)
    if not ok:
        raise InvalidValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {x!r}")


@torch._disable_dynamo  # the convergence test reads the device every few iterations: run eagerly
def _solve(
    cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    eps: float,
    max_iter: int,
    tol: float,
    log_domain: bool,
    check_every: int,
    out_dtype: torch.dtype,
) -> OTResult:
    # Exact reparametrisation: a row-constant shift of C is absorbed by f (see module notes).
    row_min = cost.amin(-1, keepdim=True)  # [B, N, 1]
    m = (row_min - cost) / eps  # -C'/eps <= 0, each row's max is 0: [B, N, K]
    a, b = log_a.exp(), log_b.exp()
    n_iter = 0

    if log_domain:
        # Carry log P = (f + g - C) / eps itself rather than the potentials: its significant
        # entries are O(log NK) while f/eps and g/eps reach range(C)/eps (2000 at eps=1e-3), and
        # recomputing every entry from them costs ~1e-4 relative in float32, which caps the
        # marginals near 1e-5 when the potentials are large; updating log P in place of that
        # keeps them near 1e-7.
        # Tokens on the last axis: log P is held as [B, K, N], where both reductions (over K per
        # token, over N per subspace) run about twice as fast on CPU as on [B, N, K], whose
        # reduction over a last axis of length K ~ 8 vectorises poorly.
        log_p = m.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        # Without autograd, update in place: no fresh [B, K, N] tensor twice per iteration.
        inplace = not (torch.is_grad_enabled() and log_p.requires_grad)
        # The potentials accumulate many updates of up to range(C)/eps: compensated (Kahan)
        # sums keep their float32 error at one rounding of the total.
        u, u_c = torch.zeros_like(log_a), torch.zeros_like(log_a)
        v, v_c = torch.zeros_like(log_b), torch.zeros_like(log_b)
        for it in range(max_iter):
            row_lse = torch.logsumexp(log_p, dim=1)  # [B, N]: log row masses of the current plan
            if it > 0 and tol > 0 and it % check_every == 0:
                # Columns are exact after the previous g-update; the row error comes for free.
                with torch.no_grad():
                    err = (row_lse.exp() - a).abs().sum(-1)
                if float(err.max()) < tol:
                    break
            du = log_a - row_lse  # f-update
            log_p = log_p.add_(du[:, None, :]) if inplace else log_p + du[:, None, :]
            dv = log_b - torch.logsumexp(log_p, dim=-1)  # g-update
            log_p = log_p.add_(dv[:, :, None]) if inplace else log_p + dv[:, :, None]
            u, u_c = _kahan_add(u, u_c, du)
            v, v_c = _kahan_add(v, v_c, dv)
            n_iter += 1
        log_plan = log_p.transpose(1, 2).contiguous()
        plan = log_plan.exp()
    else:
        kern = m.exp()  # [B, N, K]; each row's min maps to exp(0) = 1, the rest may underflow
        kern_t = kern.transpose(1, 2)
        u, v = torch.ones_like(a), torch.ones_like(b)
        for it in range(max_iter):
            kv = torch.bmm(kern, v[:, :, None])[..., 0]  # [B, N]
            if it > 0 and tol > 0 and it % check_every == 0:
                with torch.no_grad():
                    err = (u * kv - a).abs().sum(-1)
                if float(err.max()) < tol:
                    break
            u = a / kv
            v = b / torch.bmm(kern_t, u[:, :, None])[..., 0]
            n_iter += 1
        plan = u[:, :, None] * kern * v[:, None, :]
        if not bool((torch.isfinite(u) & (u > 0)).all() & (torch.isfinite(v) & (v > 0)).all() & torch.isfinite(plan).all()):
            raise NumericalError(
                f"standard-domain Sinkhorn under/overflowed at epsilon={eps:g} "
                f"(cost range / epsilon too large for {cost.dtype}); use log_domain=True"
            )
        u, v = u.log(), v.log()
        log_plan = u[:, :, None] + v[:, None, :] + m

    with torch.no_grad():
        p = plan.detach()
        marginal_error = (p.sum(-1) - a).abs().sum(-1) + (p.sum(-2) - b).abs().sum(-1)
    f = eps * u + row_min[..., 0]
    g = eps * v
    return OTResult(plan.to(out_dtype), log_plan.to(out_dtype), f, g, n_iter, marginal_error)


def _kahan_add(total: torch.Tensor, comp: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of compensated summation: (total, compensation) after adding x."""
    y = x - comp
    t = total + y
    return t, (t - total) - y


def row_normalize(plan: torch.Tensor) -> torch.Tensor:
    """Rescale each row (token) to sum to 1: its assignment as a distribution over subspaces.

    plan: [..., K] nonnegative. Returns [..., K]; a row that sums to 0 stays 0 (no NaN).
    """
    total = plan.sum(-1, keepdim=True)
    # where() rather than clamping the denominator: an all-zero row has nothing to distribute.
    return torch.where(total > 0, plan / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(plan))


def topk_mask(plan: torch.Tensor, k: int, renormalize: bool = True) -> torch.Tensor:
    """Keep each row's (token's) ``k`` largest entries, zero the rest, optionally renormalise rows.

    Exactly ``min(k, K)`` entries are kept per row even with ties (which of the tied entries is
    kept is ``torch.topk``'s choice). ``k >= K`` keeps the dense plan. Gradients flow to the kept
    entries (the mask itself is piecewise constant).

    Args:
        plan: [B, N, K] (any [..., K]) nonnegative, e.g. ``sinkhorn(...).plan``.
        k: entries kept per row, >= 1.
        renormalize: rescale each row to sum to 1 (:func:`row_normalize`).

    Returns:
        [B, N, K] like ``plan``.
    """
    _check_int("k", k)
    if plan.dim() < 1 or plan.shape[-1] == 0:
        raise InvalidValueError(f"plan must have shape [..., K] with K >= 1, got {tuple(plan.shape)}")
    if k < plan.shape[-1]:
        idx = torch.topk(plan, int(k), dim=-1).indices
        # a comparison, not a scatter: the same mask, and an ONNX export keeps its batch size dynamic
        keep = (idx.unsqueeze(-1) == torch.arange(plan.shape[-1], device=plan.device)).any(dim=-2)
        plan = torch.where(keep, plan, torch.zeros_like(plan))
    return row_normalize(plan) if renormalize else plan


def softmax_assignment(cost: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Row softmax of ``-cost / temperature``: each token's distribution over subspaces with no
    subspace (column) marginal, the ablation of :func:`sinkhorn` ("OT vs softmax").

    With ``temperature == epsilon`` this is the row-normalised plan after Sinkhorn's first half
    step, i.e. entropic OT with only the row constraint. For a similarity ``s`` (cost ``1 - s``)
    pass ``-s``: the softmax is shift-invariant.

    cost: [B, N, K] float. temperature: > 0. Returns [B, N, K]; rows sum to 1.
    """
    _check_real("temperature", temperature, positive=True)
    if not isinstance(cost, torch.Tensor) or not cost.is_floating_point() or cost.dim() < 1:
        raise InvalidValueError(f"cost must be a floating-point torch.Tensor [B, N, K], got {type(cost).__name__}"
                                f"{f' of dtype {cost.dtype} and shape {tuple(cost.shape)}' if isinstance(cost, torch.Tensor) else ''}")
    return torch.softmax(-cost / temperature, dim=-1)
