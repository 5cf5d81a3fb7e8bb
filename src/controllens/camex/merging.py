"""Merging expert weights: flat (SMEAR), task vectors, Ties, DARE and CAMEx.

Every function here works on one weight matrix per expert, stacked along a
leading ``expert`` axis, and on routing weights with a leading ``*group`` axis
(one row per routing group: a token, a sequence or a segment). Axis names:
``expert`` (routed experts), ``group`` (routing groups), ``n_routed`` (the
last axis of routing weights; it must equal ``expert``, which is checked with
a clear error), ``d_out`` / ``d_in`` (the rows and columns of one linear map),
``rank`` (Kronecker terms).

The equations (CAMEx, arXiv 2502.18821, with task vectors tau_i = W_i - W_0):

- SMEAR (flat):      W = sum_i s_i W_i
- task vectors:      W = W_0 + alpha sum_i s_i tau_i
- Ties:              tau_i <- tau_i * [sign(tau_i) == sign(sum_j tau_j)]
- DARE:              tau_i <- tau_i * Bernoulli(1 - p) / (1 - p)
- CAMEx:             W = W_0 + alpha sum_i s_i M_i(tau_i)
- EP-CAMEx:          W^l = W^{l-1} + alpha sum_i s_i M_i(W_i^l - W^{l-1})

``M_i`` is a :class:`KroneckerCurvature`: ``rank`` terms
``(P_r kron Q_r) tau (U_r kron V_r)^T`` that act on both sides of ``tau``. The
factors are applied one at a time to ``tau`` reshaped as a 4-D array, so the
``d_out x d_out`` and ``d_in x d_in`` Kronecker products are never formed.
"""

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from controllens.errors import MergeError

__all__ = [
    "KroneckerCurvature",
    "camex_merge",
    "dare",
    "ep_camex_merge",
    "kronecker_sizes",
    "smear_merge",
    "stack_experts",
    "task_vector_merge",
    "task_vectors",
    "ties_elect",
]


def stack_experts(
    weights: Sequence[Float[Tensor, "d_out d_in"]],
) -> Float[Tensor, "expert d_out d_in"]:
    """Stacks expert weight matrices after checking that their shapes agree.

    Args:
        weights: one matrix per expert.

    Returns:
        The matrices stacked along a new leading ``expert`` axis.

    Raises:
        MergeError: if there are no experts or their shapes differ.

    Examples:
        >>> stack_experts([torch.zeros(3, 2), torch.ones(3, 2)]).shape
        torch.Size([2, 3, 2])
    """
    if len(weights) == 0:
        raise MergeError("expected at least one expert weight, got none")
    shapes = [tuple(w.shape) for w in weights]
    if len(set(shapes)) != 1:
        raise MergeError(
            f"expected experts of one shape, got shapes {shapes}; "
            "experts can only be merged entry by entry when their shapes agree"
        )
    return torch.stack(list(weights))


def _check_routing(experts: Tensor, routing: Tensor, name: str = "experts") -> None:
    if routing.shape[-1] != experts.shape[0]:
        raise MergeError(
            f"expected routing weights over {experts.shape[0]} {name}, got a "
            f"last axis of {routing.shape[-1]} (shape {tuple(routing.shape)})"
        )


def smear_merge(
    experts: Float[Tensor, "expert d_out d_in"],
    routing: Float[Tensor, "*group n_routed"],
) -> Float[Tensor, "*group d_out d_in"]:
    """Flat, router-weighted average of expert weights (SMEAR).

    ``W = sum_i s_i W_i``.

    Args:
        experts: the expert weights.
        routing: routing weights ``s``, one row per routing group.

    Returns:
        One merged matrix per routing group.

    Examples:
        >>> experts = torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])
        >>> smear_merge(experts, torch.tensor([0.25, 0.75]))
        tensor([[0.7500, 0.7500],
                [0.7500, 0.7500]])
    """
    _check_routing(experts, routing)
    return torch.einsum("...e,eoi->...oi", routing, experts)


def task_vectors(
    base: Float[Tensor, "d_out d_in"],
    experts: Float[Tensor, "expert d_out d_in"],
) -> Float[Tensor, "expert d_out d_in"]:
    """Task vectors ``tau_i = W_i - W_0`` of experts relative to a base expert.

    Examples:
        >>> task_vectors(torch.ones(1, 2), torch.full((3, 1, 2), 3.0))[0]
        tensor([[2., 2.]])
    """
    if base.shape != experts.shape[1:]:
        raise MergeError(
            f"expected a base expert of shape {tuple(experts.shape[1:])}, got "
            f"{tuple(base.shape)}; the base must match every expert"
        )
    return experts - base


def task_vector_merge(
    base: Float[Tensor, "d_out d_in"],
    taus: Float[Tensor, "expert d_out d_in"],
    routing: Float[Tensor, "*group n_routed"],
    alpha: float = 1.0,
) -> Float[Tensor, "*group d_out d_in"]:
    """Flat merge of task vectors: ``W = W_0 + alpha sum_i s_i tau_i``.

    Examples:
        >>> taus = torch.stack([torch.ones(1, 2), -torch.ones(1, 2)])
        >>> task_vector_merge(torch.zeros(1, 2), taus, torch.tensor([0.75, 0.25]))
        tensor([[0.5000, 0.5000]])
    """
    _check_routing(taus, routing, "task vectors")
    return base + alpha * torch.einsum("...e,eoi->...oi", routing, taus)


def ties_elect(
    taus: Float[Tensor, "expert d_out d_in"],
    density: float | None = None,
) -> Float[Tensor, "expert d_out d_in"]:
    """Ties-style trimming and sign election on task vectors.

    Each task vector first keeps its ``density`` largest entries by magnitude
    (all of them when ``density`` is None); then every entry whose sign
    disagrees with the sign of the sum over experts is zeroed. The election
    uses the unweighted sum, so the mask is the same for every routing group
    and the merge stays linear in the routing weights.

    Args:
        taus: task vectors.
        density: fraction in (0, 1] of entries each expert keeps.

    Returns:
        The trimmed and sign-elected task vectors (gradients flow through the
        entries kept).

    Examples:
        >>> taus = torch.tensor([[[1.0, -2.0]], [[3.0, 1.0]]])
        >>> ties_elect(taus)
        tensor([[[ 1., -2.]],
        <BLANKLINE>
                [[ 3.,  0.]]])
    """
    if density is not None:
        if not 0.0 < density <= 1.0:
            raise MergeError(f"expected a density in (0, 1], got {density}")
        flat = taus.detach().abs().flatten(1)
        keep = max(1, math.ceil(density * flat.shape[1]))
        threshold = flat.topk(keep, dim=1).values[:, -1]
        taus = taus * (taus.detach().abs() >= threshold[:, None, None])
    elected = torch.sign(taus.detach().sum(0))
    return taus * (torch.sign(taus.detach()) == elected)


def dare(
    taus: Float[Tensor, "expert d_out d_in"],
    drop: float,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "expert d_out d_in"]:
    """DARE: drops task-vector entries with probability ``drop`` and rescales.

    ``tau_i <- tau_i * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``, which keeps
    the expected task vector unchanged.

    Examples:
        >>> dare(torch.ones(1, 2, 2), drop=0.0)
        tensor([[[1., 1.],
                 [1., 1.]]])
    """
    if not 0.0 <= drop < 1.0:
        raise MergeError(f"expected a drop probability in [0, 1), got {drop}")
    if drop == 0.0:
        return taus
    keep = torch.rand(taus.shape, generator=generator, device=taus.device)
    return taus * (keep >= drop).to(taus.dtype) / (1.0 - drop)


def kronecker_sizes(width: int, factor: int | None = None) -> tuple[int, int]:
    """Splits a width into the sizes ``(a, b)`` of a Kronecker factorisation.

    Args:
        width: the side the factors act on (``d_out`` or ``d_in``).
        factor: the size ``a`` of the first factor; it must divide ``width``.
            None picks the divisor closest to ``sqrt(width)`` from below,
            which makes ``a**2 + b**2`` (the parameter count) smallest.

    Returns:
        ``(a, b)`` with ``a * b == width``.

    Raises:
        MergeError: if ``factor`` does not divide ``width``.

    Examples:
        >>> kronecker_sizes(1536), kronecker_sizes(576, 8)
        ((32, 48), (8, 72))
    """
    if width < 1:
        raise MergeError(f"expected a positive width, got {width}")
    if factor is None:
        factor = max(d for d in range(1, math.isqrt(width) + 1) if width % d == 0)
    if factor < 1 or width % factor != 0:
        raise MergeError(
            f"expected a Kronecker factor that divides the width {width}, got "
            f"{factor}; pick a divisor of {width} or leave it as None"
        )
    return factor, width // factor


class KroneckerCurvature(nn.Module):
    """Learned curvature operators ``M_i``, one per expert, Kronecker-factored.

    ``M_i(tau) = sum_r (P_ir kron Q_ir) tau (U_ir kron V_ir)^T`` with
    ``P: a x a``, ``Q: b x b`` (``a b = d_out``) and ``U: c x c``,
    ``V: d x d`` (``c d = d_in``). Term 0 starts at the identity; the other
    terms start at zero with ``Q = 0`` and a small random ``P`` (LoRA style),
    so ``M_i`` is exactly the identity at initialisation while the terms do
    not share gradients and can diverge from each other.

    Args:
        n_experts: number of experts (one operator each).
        d_out: rows of the task vectors.
        d_in: columns of the task vectors.
        rank: number of Kronecker terms ``R``.
        out_factor: size ``a`` of ``P`` (None: near ``sqrt(d_out)``).
        in_factor: size ``c`` of ``U`` (None: near ``sqrt(d_in)``).

    Examples:
        >>> curvature = KroneckerCurvature(n_experts=2, d_out=6, d_in=4, rank=2)
        >>> tau = torch.randn(2, 6, 4)
        >>> torch.allclose(curvature(tau), tau)
        True
    """

    def __init__(
        self,
        *,
        n_experts: int,
        d_out: int,
        d_in: int,
        rank: int = 1,
        out_factor: int | None = None,
        in_factor: int | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise MergeError(f"expected a curvature rank >= 1, got {rank}")
        a, b = kronecker_sizes(d_out, out_factor)
        c, d = kronecker_sizes(d_in, in_factor)
        self.sizes = (a, b, c, d)
        self.rank = rank

        def eye(n: int) -> Tensor:
            return torch.eye(n).expand(n_experts, rank, n, n).clone()

        self.P = nn.Parameter(eye(a))
        self.Q = nn.Parameter(eye(b))
        self.U = nn.Parameter(eye(c))
        self.V = nn.Parameter(eye(d))
        with torch.no_grad():
            self.P[:, 1:] = torch.randn(n_experts, rank - 1, a, a) / a
            self.Q[:, 1:] = 0.0

    def set_identity(self) -> None:
        """Sets every factor of every term to the identity (``M = R * id``)."""
        with torch.no_grad():
            for factor in (self.P, self.Q, self.U, self.V):
                factor.copy_(torch.eye(factor.shape[-1]).expand_as(factor))

    def forward(
        self, taus: Float[Tensor, "expert d_out d_in"]
    ) -> Float[Tensor, "expert d_out d_in"]:
        """Applies ``M_i`` to the task vector of expert ``i``, for every ``i``."""
        a, b, c, d = self.sizes
        t = taus.reshape(taus.shape[0], a, b, c, d)
        t = torch.einsum("erik,eklmn->erilmn", self.P, t)
        t = torch.einsum("erjl,erilmn->erijmn", self.Q, t)
        t = torch.einsum("erpm,erijmn->erijpn", self.U, t)
        t = torch.einsum("erqn,erijpn->eijpq", self.V, t)
        return t.reshape(taus.shape)

    def mix(
        self,
        weights: Float[Tensor, "group d_out d_in"],
        coeffs: Float[Tensor, "group expert"],
    ) -> Float[Tensor, "group d_out d_in"]:
        """``sum_i c_gi M_i(w_g)``: every operator applied to every group's matrix.

        EP-CAMEx needs this because its base differs per routing group.
        """
        a, b, c, d = self.sizes
        t = weights.reshape(weights.shape[0], a, b, c, d)
        t = torch.einsum("ge,erik,gklmn->gerilmn", coeffs, self.P, t)
        t = torch.einsum("erjl,gerilmn->gerijmn", self.Q, t)
        t = torch.einsum("erpm,gerijmn->gerijpn", self.U, t)
        t = torch.einsum("erqn,gerijpn->gijpq", self.V, t)
        return t.reshape(weights.shape)


def camex_merge(
    base: Float[Tensor, "d_out d_in"],
    taus: Float[Tensor, "expert d_out d_in"],
    routing: Float[Tensor, "*group n_routed"],
    curvature: KroneckerCurvature,
    alpha: float = 1.0,
) -> Float[Tensor, "*group d_out d_in"]:
    """Curvature-aware merge: ``W = W_0 + alpha sum_i s_i M_i(tau_i)``.

    With every ``M_i`` at its initial identity this equals
    :func:`task_vector_merge`; with every factor of all ``R`` terms set to the
    identity (:meth:`KroneckerCurvature.set_identity`) it equals the flat
    merge with ``alpha`` scaled by ``R``.

    Examples:
        >>> curvature = KroneckerCurvature(n_experts=1, d_out=2, d_in=2)
        >>> base, taus = torch.zeros(2, 2), torch.ones(1, 2, 2)
        >>> camex_merge(base, taus, torch.ones(1), curvature)
        tensor([[1., 1.],
                [1., 1.]], grad_fn=<AddBackward0>)
    """
    _check_routing(taus, routing, "task vectors")
    return task_vector_merge(base, curvature(taus), routing, alpha)


def ep_camex_merge(
    previous: Float[Tensor, "group d_out d_in"],
    experts: Float[Tensor, "expert d_out d_in"],
    routing: Float[Tensor, "group n_routed"],
    curvature: KroneckerCurvature,
    alpha: float = 1.0,
) -> Float[Tensor, "group d_out d_in"]:
    """Dynamic CAMEx: the merged expert of the layer before is this layer's base.

    ``W = W_prev + alpha sum_i s_i M_i(W_i - W_prev)``, computed as
    ``W_prev + alpha (sum_i s_i M_i(W_i) - sum_i s_i M_i(W_prev))`` so that the
    static part is transformed once and only ``W_prev`` per group.

    Examples:
        >>> curvature = KroneckerCurvature(n_experts=2, d_out=2, d_in=2)
        >>> previous = torch.zeros(1, 2, 2)
        >>> experts = torch.stack([torch.ones(2, 2), 3 * torch.ones(2, 2)])
        >>> ep_camex_merge(previous, experts, torch.tensor([[0.5, 0.5]]),
        ...                curvature)[0]
        tensor([[2., 2.],
                [2., 2.]], grad_fn=<SelectBackward0>)
    """
    _check_routing(experts, routing)
    if previous.shape[1:] != experts.shape[1:]:
        raise MergeError(
            f"expected a previous merged expert of shape "
            f"{tuple(experts.shape[1:])}, got {tuple(previous.shape[1:])}; "
            "EP-CAMEx chains layers whose experts have one shape"
        )
    static = torch.einsum("ge,eoi->goi", routing, curvature(experts))
    return previous + alpha * (static - curvature.mix(previous, routing))
