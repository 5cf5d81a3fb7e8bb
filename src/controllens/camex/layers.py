"""A merged-experts MoE layer that replaces a gated or plain MLP, and its routers.

Axis names, besides TransformerLens' ``batch``, ``pos``, ``d_model``,
``d_mlp``: ``expert`` (routed experts), ``group`` (routing groups of one
sequence: its tokens, the whole sequence, or its causal segments).

Two ways to compute a merged linear map ``y = (W_0 + sum_i c_gi T_i) x`` are
implemented, and :func:`choose_path` picks the cheaper one from the shapes:

- ``"weights"``: materialise one merged matrix per routing group (as the
  reference code does per sample), then apply it. Cheap when groups hold many
  tokens (per-sequence or segment routing).
- ``"outputs"``: never build a merged matrix; scale the input by each
  expert's coefficient and run all task vectors in one matrix product,
  ``y = W_0 x + [c_1 x, ..., c_N x] [T_1 ... T_N]^T``. Cheap for per-token
  routing, where a merged matrix per token would cost ``d_out x d_in`` each.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from controllens.camex.merging import (
    KroneckerCurvature,
    dare,
    ep_camex_merge,
    ties_elect,
)
from controllens.errors import MergeError

__all__ = [
    "ExpertChain",
    "MergedExperts",
    "MoEConfig",
    "Router",
    "choose_path",
    "collect_aux_losses",
    "moe_layers",
]

MergeMethod = Literal[
    "mixture", "smear", "task_vector", "ties", "dare", "camex", "ep_camex"
]
RouterKind = Literal["softmax", "noisy_top_k"]
Granularity = Literal["token", "sequence", "segment"]
MergePath = Literal["auto", "weights", "outputs"]

# multiply-adds charged per materialised weight element (see choose_path)
_MATERIALISE_COST = 512
_BASE_METHODS = ("task_vector", "ties", "dare", "camex", "ep_camex")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """How a merged-experts layer routes and merges.

    Attributes:
        n_experts: routed experts ``N`` (methods with a base expert hold one
            more matrix per projection, except chained EP-CAMEx layers).
        method: ``"mixture"`` (classic MoE: mix expert outputs), ``"smear"``
            (flat average of weights), ``"task_vector"``, ``"ties"``,
            ``"dare"``, ``"camex"`` or ``"ep_camex"``.
        router: ``"softmax"`` (dense) or ``"noisy_top_k"``.
        top_k: experts kept per group by the noisy top-k router.
        granularity: route each ``"token"``, each ``"sequence"`` (leaks
            future tokens in a causal LM: for classification), or each causal
            ``"segment"`` (Lory: a segment is merged with the routing weights
            of the previous one; the first uses its own, detached).
        segment_length: tokens per segment for segment routing.
        alpha: scale of the merged task vectors.
        curvature_rank: Kronecker terms ``R`` per curvature operator.
        out_factor: size of the first Kronecker factor on the output side.
        in_factor: size of the first Kronecker factor on the input side.
        ties_density: fraction of task-vector entries Ties keeps.
        dare_drop: DARE drop probability (applied in training mode only).
        noise_std: scale of the noisy top-k router's noise.
        path: ``"auto"``, ``"weights"`` or ``"outputs"`` (see module docs).

    Examples:
        >>> config = MoEConfig(n_experts=8, router="noisy_top_k", top_k=2)
        >>> config.uses_base, config.group_length
        (True, 1)
        >>> MoEConfig(granularity="segment", segment_length=16).group_length
        16
        >>> MoEConfig(method="mixture").uses_base
        False
    """

    n_experts: int = 4
    method: MergeMethod = "camex"
    router: RouterKind = "softmax"
    top_k: int | None = None
    granularity: Granularity = "token"
    segment_length: int | None = None
    alpha: float = 1.0
    curvature_rank: int = 1
    out_factor: int | None = None
    in_factor: int | None = None
    ties_density: float | None = None
    dare_drop: float = 0.0
    noise_std: float = 1.0
    path: MergePath = "auto"

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise MergeError(f"expected n_experts >= 1, got {self.n_experts}")
        if self.router == "noisy_top_k" and self.top_k is None:
            raise MergeError(
                "expected top_k for the noisy_top_k router, got None; "
                "set top_k to the number of experts each group keeps"
            )
        if self.top_k is not None and not 1 <= self.top_k <= self.n_experts:
            raise MergeError(
                f"expected top_k between 1 and n_experts={self.n_experts}, got "
                f"{self.top_k}; lower top_k or add experts"
            )
        if self.granularity == "segment" and (
            self.segment_length is None or self.segment_length < 1
        ):
            raise MergeError(
                "expected a positive segment_length for segment routing, got "
                f"{self.segment_length}"
            )
        if not 0.0 <= self.dare_drop < 1.0:
            raise MergeError(f"expected dare_drop in [0, 1), got {self.dare_drop}")

    @property
    def uses_base(self) -> bool:
        """Whether the method merges task vectors relative to a base expert."""
        return self.method in _BASE_METHODS

    @property
    def group_length(self) -> int | None:
        """Tokens per routing group (None: the whole sequence)."""
        if self.granularity == "token":
            return 1
        if self.granularity == "segment":
            return self.segment_length
        return None


def choose_path(
    *, n_groups: int, n_tokens: int, n_experts: int, d_out: int, d_in: int
) -> Literal["weights", "outputs"]:
    """Picks the cheaper way to compute a merged linear map.

    The estimate counts multiply-adds: ``G N o i + T o i`` for the weights
    path (merge, apply) against ``T (N + 1) o i`` for the outputs path, plus a
    charge of ``_MATERIALISE_COST`` multiply-adds per element of the
    materialised ``[G, o, i]`` weights, which on CPUs cost far more than their
    arithmetic (writing them, their gradient, and small batched products).
    The charge was calibrated with ``benchmarks/camex_merge_paths.py`` on two
    CPU cores (SmolLM2 shapes); it is a rough constant, not a law.

    Examples:
        >>> choose_path(n_groups=8, n_tokens=2048, n_experts=4, d_out=64,
        ...             d_in=32)
        'weights'
        >>> choose_path(n_groups=2048, n_tokens=2048, n_experts=4, d_out=64,
        ...             d_in=32)
        'outputs'
    """
    size = d_out * d_in
    weights = (n_groups * (n_experts + _MATERIALISE_COST) + n_tokens) * size
    outputs = n_tokens * (n_experts + 1) * size
    return "weights" if weights < outputs else "outputs"


class Router(nn.Module):
    """Softmax or noisy top-k router over tokens, sequences or causal segments.

    The router weight starts at zero, so routing starts uniform (a merged
    layer over identical experts then equals the dense MLP).

    Examples:
        >>> router = Router(8, MoEConfig(n_experts=3, granularity="sequence"))
        >>> logits, weights, aux = router(torch.randn(2, 5, 8))
        >>> weights.shape, weights.sum(-1)
        (torch.Size([2, 1, 3]), tensor([[1.],
                [1.]], grad_fn=<SumBackward1>))
    """

    def __init__(self, d_model: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.n_experts, d_model))
        self.noise_weight = (
            nn.Parameter(torch.zeros(config.n_experts, d_model))
            if config.router == "noisy_top_k"
            else None
        )

    def pool(
        self, hidden: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch group d_model"]:
        """Averages the hidden states of each routing group."""
        length = self.config.group_length
        if length == 1:
            return hidden
        if length is None:
            return hidden.mean(1, keepdim=True)
        batch, pos, d_model = hidden.shape
        n_groups = -(-pos // length)
        padded = F.pad(hidden, (0, 0, 0, n_groups * length - pos))
        sums = padded.reshape(batch, n_groups, length, d_model).sum(2)
        counts = torch.full((n_groups,), float(length), device=hidden.device)
        counts[-1] = pos - (n_groups - 1) * length
        return sums / counts[:, None].to(sums.dtype)

    def forward(
        self, hidden: Float[Tensor, "batch pos d_model"]
    ) -> tuple[
        Float[Tensor, "batch group expert"],
        Float[Tensor, "batch group expert"],
        Float[Tensor, ""],
    ]:
        """Router logits, routing weights used for merging, load-balancing loss."""
        config = self.config
        pooled = self.pool(hidden)
        logits = F.linear(pooled, self.weight)
        if config.router == "softmax":
            weights = logits.softmax(-1)
            aux = logits.new_zeros(())
        else:
            weights, aux = self._noisy_top_k(pooled, logits)
        if config.granularity == "segment":
            # Lory: segment j uses segment j-1's weights; the first segment
            # uses its own, detached, so no gradient leaks from its future.
            weights = torch.cat([weights[:, :1].detach(), weights[:, :-1]], 1)
        return logits, weights, aux

    def _noisy_top_k(self, pooled: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        # noisy top-k gating (Shazeer et al. 2017, eq. 3-5)
        config = self.config
        if self.noise_weight is None or config.top_k is None:
            raise RuntimeError(
                "Noisy top-k routing needs the noise weights and top_k that "
                "Router builds from MoEConfig(router='noisy_top_k', top_k=...)."
            )
        noisy = logits
        if self.training and config.noise_std > 0:
            scale = F.softplus(F.linear(pooled, self.noise_weight))
            noisy = logits + torch.randn_like(logits) * scale * config.noise_std
        top = noisy.topk(config.top_k, dim=-1)
        kept = torch.full_like(noisy, float("-inf")).scatter(
            -1, top.indices, top.values
        )
        weights = kept.softmax(-1)

        # load balancing (Switch Transformer): N sum_i f_i P_i, with f_i the
        # share of top-k slots given to expert i and P_i its mean probability
        probs = logits.softmax(-1).flatten(0, -2)
        chosen = torch.zeros_like(probs).scatter(-1, top.indices.flatten(0, -2), 1.0)
        share = chosen.mean(0) / config.top_k
        aux = config.n_experts * (share * probs.mean(0)).sum()
        return weights, aux


class ExpertChain:
    """Carries EP-CAMEx merged weights from one layer to the next in a forward.

    The first layer of a chain (the one holding a base expert) overwrites the
    carried weights at every forward; the later ones read and replace them.
    This relies on the layers running in order within one forward pass, so it
    does not survive activation checkpointing that reruns a single layer.

    Examples:
        >>> chain = ExpertChain()
        >>> config = MoEConfig(n_experts=2, method="ep_camex")
        >>> first = MergedExperts(config, d_model=8, d_mlp=16, chain=chain)
        >>> second = MergedExperts(config, d_model=8, d_mlp=16, has_base=False,
        ...                        chain=chain)
        >>> second(first(torch.randn(1, 3, 8))).shape  # [batch, pos, d_model]
        torch.Size([1, 3, 8])
        >>> {name: tuple(w.shape) for name, w in chain.merged.items()}
        {'gate': (3, 16, 8), 'up': (3, 16, 8), 'down': (3, 8, 16)}

        The carried weights are ``[batch * group, out, in]``: one merged matrix
        per routing group (here per token).
    """

    def __init__(self) -> None:
        self.merged: dict[str, Tensor] = {}


class _ExpertLinear(nn.Module):
    """The experts (and base, bias, curvature) of one projection."""

    def __init__(
        self, config: MoEConfig, d_out: int, d_in: int, has_base: bool, bias: bool
    ) -> None:
        super().__init__()
        n = config.n_experts
        self.config = config
        self.experts = nn.Parameter(torch.zeros(n, d_out, d_in))
        self.base = nn.Parameter(torch.zeros(d_out, d_in)) if has_base else None
        self.bias_experts = nn.Parameter(torch.zeros(n, d_out)) if bias else None
        self.bias_base = nn.Parameter(torch.zeros(d_out)) if bias and has_base else None
        self.curvature = (
            KroneckerCurvature(
                n_experts=n,
                d_out=d_out,
                d_in=d_in,
                rank=config.curvature_rank,
                out_factor=config.out_factor,
                in_factor=config.in_factor,
            )
            if config.method in ("camex", "ep_camex")
            else None
        )
        # nn.Linear's default initialisation, so a fresh layer computes something
        bound = d_in**-0.5
        with torch.no_grad():
            for param in (self.experts, self.base, self.bias_experts, self.bias_base):
                if param is not None:
                    param.uniform_(-bound, bound)

    def terms(self) -> tuple[Tensor | None, Tensor, float]:
        """``(W_0, T, scale)`` with merged weight ``W_0 + scale sum_i s_i T_i``."""
        config = self.config
        if config.method == "smear" or self.base is None:
            return None, self.experts, 1.0
        taus = self.experts - self.base
        if config.method == "ties":
            taus = ties_elect(taus, config.ties_density)
        elif config.method == "dare" and self.training:
            taus = dare(taus, config.dare_drop)
        elif self.curvature is not None:
            taus = self.curvature(taus)
        return self.base, taus, config.alpha

    def bias(self, coeffs: Tensor) -> Tensor | None:
        if self.bias_experts is None:
            return None
        if self.bias_base is None:
            return coeffs @ self.bias_experts
        taus = self.bias_experts - self.bias_base
        return self.bias_base + self.config.alpha * coeffs @ taus

    def forward(self, x: Tensor, coeffs: Tensor, path: str) -> Tensor:
        """``x: [batch, group, len, d_in]``, ``coeffs: [batch, group, expert]``."""
        base, deltas, scale = self.terms()
        coeffs_scaled = coeffs * scale
        batch, n_groups, length, d_in = x.shape
        if path == "auto":
            path = choose_path(
                n_groups=batch * n_groups,
                n_tokens=batch * n_groups * length,
                n_experts=deltas.shape[0],
                d_out=deltas.shape[1],
                d_in=d_in,
            )
        if path == "weights":
            merged = torch.einsum("bge,eoi->bgoi", coeffs_scaled, deltas)
            if base is not None:
                merged = merged + base
            y = torch.einsum("bgli,bgoi->bglo", x, merged)
        else:
            scaled = coeffs_scaled[:, :, None, :, None] * x[:, :, :, None, :]
            stacked = deltas.permute(1, 0, 2).reshape(deltas.shape[1], -1)
            y = scaled.flatten(-2) @ stacked.T
            if base is not None:
                y = y + x @ base.T
        bias = self.bias(coeffs)
        return y if bias is None else y + bias[:, :, None, :]

    def forward_dynamic(
        self, x: Tensor, coeffs: Tensor, previous: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """EP-CAMEx: merge on top of the previous layer's merged weights."""
        if self.curvature is None:
            raise RuntimeError("EP-CAMEx needs the curvature its config builds.")
        batch, n_groups = coeffs.shape[:2]
        flat = coeffs.flatten(0, 1)
        if previous is None:
            base, deltas, scale = self.terms()
            if base is None:
                raise MergeError(
                    "expected the first layer of the EP-CAMEx chain to run "
                    "before this one, got no carried weights; run the whole model"
                )
            merged = base + scale * torch.einsum("ge,eoi->goi", flat, deltas)
        else:
            if previous.shape[0] != flat.shape[0]:
                raise MergeError(
                    f"expected {flat.shape[0]} routing groups from the previous "
                    f"EP-CAMEx layer, got {previous.shape[0]}; chained layers "
                    "need the same granularity"
                )
            merged = ep_camex_merge(
                previous, self.experts, flat, self.curvature, self.config.alpha
            )
        weights = merged.reshape(batch, n_groups, *merged.shape[1:])
        y = torch.einsum("bgli,bgoi->bglo", x, weights)
        bias = self.bias(coeffs)
        return (y if bias is None else y + bias[:, :, None, :]), merged

    def expert_output(self, x: Tensor, index: int) -> Tensor:
        bias = None if self.bias_experts is None else self.bias_experts[index]
        return F.linear(x, self.experts[index], bias)


class MergedExperts(nn.Module):
    """A merged-experts layer in place of a gated (Llama) or plain MLP.

    Gated: ``down(act(gate x) * up x)``; plain: ``fc_out(act(fc_in x))``.
    Each projection is merged separately with the same routing weights.

    Hook points (TransformerLens ``HookPoint`` modules; add hooks with
    ``layer.hook_routing_weights.add_hook(fn)``): ``hook_router_logits``
    ``[batch, group, expert]``, ``hook_routing_weights`` (the weights used,
    editable), ``hook_aux_loss`` (scalar load-balancing loss),
    ``hook_merged_output`` ``[batch, pos, d_model]``.

    Args:
        config: routing and merging settings.
        d_model: residual width.
        d_mlp: hidden width of each expert.
        gated: gated (gate/up/down) or plain (fc_in/fc_out) MLP.
        bias: whether the projections have biases (merged flatly).
        act_fn: the activation (SiLU for Llama).
        has_base: hold a base expert (default: ``config.uses_base``). Chained
            EP-CAMEx layers after the first have none.
        chain: the :class:`ExpertChain` an EP-CAMEx layer belongs to.

    Examples:
        >>> layer = MergedExperts(MoEConfig(n_experts=2), d_model=8, d_mlp=16)
        >>> layer(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        d_model: int,
        d_mlp: int,
        gated: bool = True,
        bias: bool = False,
        act_fn: Callable[[Tensor], Tensor] | None = None,
        has_base: bool | None = None,
        chain: ExpertChain | None = None,
    ) -> None:
        super().__init__()
        has_base = config.uses_base if has_base is None else has_base
        if config.method == "ep_camex" and chain is None:
            chain = ExpertChain()
        if config.method == "ep_camex" and not has_base and chain is None:
            raise MergeError("expected an ExpertChain for an EP-CAMEx layer")
        if not has_base and config.uses_base and config.method != "ep_camex":
            raise MergeError(f"expected a base expert for method {config.method!r}")
        self.config = config
        self.gated = gated
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        self.chain = chain
        self.starts_chain = has_base
        names = ("gate", "up", "down") if gated else ("fc_in", "fc_out")
        shapes = {"down": (d_model, d_mlp), "fc_out": (d_model, d_mlp)}
        self.projections = nn.ModuleDict(
            {
                name: _ExpertLinear(
                    config, *shapes.get(name, (d_mlp, d_model)), has_base, bias
                )
                for name in names
            }
        )
        self.router = Router(d_model, config)
        self.hook_router_logits = HookPoint()
        self.hook_routing_weights = HookPoint()
        self.hook_aux_loss = HookPoint()
        self.hook_merged_output = HookPoint()

    def forward(
        self, hidden: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """Routes, merges the experts and applies the merged MLP."""
        logits, weights, aux = self.router(hidden)
        self.hook_router_logits(logits)
        weights = self.hook_routing_weights(weights)
        self.hook_aux_loss(aux)

        # split the sequence into routing groups (padding the last segment)
        batch, pos, d_model = hidden.shape
        length = self.config.group_length or pos
        n_groups = weights.shape[1]
        padded = F.pad(hidden, (0, 0, 0, n_groups * length - pos))
        x = padded.reshape(batch, n_groups, length, d_model)

        if self.config.method == "mixture":
            y = self._mixture(x, weights)
        elif self.config.method == "ep_camex":
            y = self._dynamic(x, weights)
        else:
            y = self._merged(x, weights)
        out = y.reshape(batch, n_groups * length, d_model)[:, :pos]
        return self.hook_merged_output(out)

    def _mlp(self, x: Tensor, linear: Callable[[str, Tensor], Tensor]) -> Tensor:
        if self.gated:
            hidden = self.act_fn(linear("gate", x)) * linear("up", x)
            return linear("down", hidden)
        return linear("fc_out", self.act_fn(linear("fc_in", x)))

    def _merged(self, x: Tensor, weights: Tensor) -> Tensor:
        path = self.config.path
        return self._mlp(x, lambda name, v: self.projections[name](v, weights, path))

    def _dynamic(self, x: Tensor, weights: Tensor) -> Tensor:
        if self.chain is None:
            raise RuntimeError(
                "An EP-CAMEx layer runs inside an ExpertChain; upcycle() links "
                "the chained layers."
            )
        if self.starts_chain:
            self.chain.merged = {}

        def linear(name: str, v: Tensor) -> Tensor:
            previous = self.chain.merged.get(name)
            y, merged = self.projections[name].forward_dynamic(v, weights, previous)
            self.chain.merged[name] = merged
            return y

        return self._mlp(x, linear)

    def _mixture(self, x: Tensor, weights: Tensor) -> Tensor:
        # classic MoE: run each expert on the tokens that route to it
        length = x.shape[2]
        tokens = x.flatten(0, 2)
        per_token = weights.repeat_interleave(length, dim=1).flatten(0, 1)
        out = torch.zeros_like(tokens)
        for index in range(self.config.n_experts):
            rows = per_token[:, index].nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            y = self._mlp(
                tokens[rows],
                lambda name, v, i=index: self.projections[name].expert_output(v, i),
            )
            out = out.index_add(0, rows, y * per_token[rows, index, None])
        return out.reshape(x.shape)


def moe_layers(model: nn.Module) -> list[tuple[str, MergedExperts]]:
    """Every :class:`MergedExperts` inside a model, with its module name.

    Examples:
        >>> layer = MergedExperts(MoEConfig(n_experts=2), d_model=8, d_mlp=16)
        >>> [name for name, _ in moe_layers(nn.Sequential(layer))]
        ['0']
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MergedExperts)]


@contextlib.contextmanager
def collect_aux_losses(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collects the load-balancing losses of every merged-experts layer.

    Yields:
        A list that receives one scalar per layer and forward pass.

    Examples:
        >>> config = MoEConfig(n_experts=2, router="noisy_top_k", top_k=1)
        >>> layer = MergedExperts(config, d_model=8, d_mlp=16)
        >>> with collect_aux_losses(layer) as losses:
        ...     _ = layer(torch.randn(1, 4, 8))
        >>> len(losses)
        1
    """
    losses: list[Tensor] = []
    handles = [
        layer.hook_aux_loss.register_forward_hook(
            lambda _module, _args, output: losses.append(output)
        )
        for _, layer in moe_layers(model)
    ]
    try:
        yield losses
    finally:
        for handle in handles:
            handle.remove()
