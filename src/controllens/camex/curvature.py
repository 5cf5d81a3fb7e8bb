"""Curvature of expert weights estimated from calibration data.

For models not trained with CAMEx there are no learned curvature operators, so
merge probes estimate the curvature of the language-modelling loss with
respect to each expert's weights from data, in two standard forms:

- the diagonal empirical Fisher, ``F_i[o, j] = mean_t delta_ti[o]**2 x_ti[j]**2``
  (per-token gradients of a linear map ``y = W x`` are ``delta x^T``, so the
  diagonal needs no per-token gradient matrices);
- a Kronecker-factored estimate (K-FAC, Martens and Grosse 2015, eq. 1):
  ``F_i ~ G_i kron A_i`` with ``A_i = mean_t x x^T`` over tokens routed to
  ``i`` and ``G_i = mean_t delta delta^T``.

``delta_ti`` is the loss gradient at expert ``i``'s output on token ``t``: the
gradient at the MoE mixture's output times the routing weight, so unrouted
tokens contribute nothing. It is read with a zero tensor added to the experts
module's output (a hook), the model's own forward pass and one
``autograd.grad``; no parameter gradient is accumulated.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from controllens.camex.analysis import (
    Data,
    MoELayer,
    Runner,
    _scatter,
    calibration_batches,
    find_moe_layers,
)

__all__ = ["ExpertCurvature", "estimate_curvature"]

# tokens per chunk when expanding per-expert activations (bounds memory)
_CHUNK = 256


@dataclass(frozen=True, kw_only=True, eq=False)
class ExpertCurvature:
    """Curvature estimates for the experts of one MoE layer.

    The projections are ``(gate, up, down)``, each ``[expert, out, in]``.

    Attributes:
        layer: the decoder layer.
        n_tokens: predicted tokens behind the estimate.
        usage: share of the routing weight each expert received (sums to 1).
        fisher: diagonal empirical Fisher of each projection.
        kfac_in: input factors ``A`` ``[expert, in, in]`` (None if not estimated).
        kfac_out: output factors ``G`` ``[expert, out, out]``.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe
        >>> tokens = torch.tensor([[1, 14, 15, 16]])  # [batch, pos]
        >>> c = estimate_curvature(tiny_moe(), tokens, layers=0)[0]
        >>> c.layer, c.n_tokens, c.usage.shape
        (0, 3, torch.Size([4]))
        >>> [tuple(f.shape) for f in c.fisher]  # gate, up: d_mlp x d_model
        [(4, 64, 32), (4, 64, 32), (4, 32, 64)]
        >>> [tuple(a.shape) for a in c.kfac_in]
        [(4, 32, 32), (4, 32, 32), (4, 64, 64)]
        >>> [tuple(g.shape) for g in c.kfac_out]
        [(4, 64, 64), (4, 64, 64), (4, 32, 32)]
    """

    layer: int
    n_tokens: int
    usage: Float[Tensor, " expert"]
    fisher: tuple[Tensor, Tensor, Tensor]
    kfac_in: tuple[Tensor, Tensor, Tensor] | None
    kfac_out: tuple[Tensor, Tensor, Tensor] | None


class _Sums:
    def __init__(self, m: MoELayer, kfac: bool) -> None:
        e, d, k = m.n_experts, m.d_model, m.d_mlp
        self.usage = torch.zeros(e, dtype=torch.float64)
        self.fisher = [torch.zeros(e, k, d), torch.zeros(e, k, d), torch.zeros(e, d, k)]
        self.kfac = kfac
        if kfac:
            self.a_x, self.a_h = torch.zeros(e, d, d), torch.zeros(e, k, k)
            self.g = [torch.zeros(e, k, k), torch.zeros(e, k, k), torch.zeros(e, d, d)]

    def add(self, m: MoELayer, x: Tensor, s: Tensor, grad: Tensor) -> None:
        _, _, down = (w.float() for w in m.projections())
        x, s, grad = x.float(), s.float(), grad.float()
        gate_pre, up_pre = m.hidden(x)
        gate_pre = gate_pre.detach().requires_grad_()
        with torch.enable_grad():
            act = m.act_fn(gate_pre)
        hidden = (act * up_pre).detach()
        d_down = s[:, :, None] * grad[:, None, :]
        d_hidden = torch.einsum("ted,edm->tem", d_down, down)
        (d_gate,) = torch.autograd.grad(act, gate_pre, d_hidden * up_pre)
        d_up = d_hidden * act.detach()
        self.usage += s.double().sum(0)
        self.fisher[0] += torch.einsum("tem,td->emd", d_gate**2, x**2)
        self.fisher[1] += torch.einsum("tem,td->emd", d_up**2, x**2)
        self.fisher[2] += torch.einsum("ted,tem->edm", d_down**2, hidden**2)
        if self.kfac:
            routed = (s > 0).float()
            self.a_x += torch.einsum("te,td,tf->edf", routed, x, x)
            self.a_h += torch.einsum("te,tem,ten->emn", routed, hidden, hidden)
            for total, delta in zip(self.g, (d_gate, d_up, d_down), strict=True):
                total += torch.einsum("tem,ten->emn", delta, delta)


def estimate_curvature(
    model: Any,
    data: Data,
    *,
    layers: int | Iterable[int] | None = None,
    kfac: bool = True,
    batch_size: int = 4,
    tokenizer: Any = None,
    progress: bool = False,
) -> dict[int, ExpertCurvature]:
    """Diagonal empirical Fisher and K-FAC factors of every expert.

    Args:
        model: a TransformerBridge, nnsight ``LanguageModel`` or HF MoE model.
        data: calibration texts or token ids.
        layers: MoE layers (None: all).
        kfac: also estimate the Kronecker factors (``[expert, d_mlp, d_mlp]``
            tensors: the memory-heavy part).
        batch_size: rows per forward and backward pass.
        tokenizer: overrides the model's (a plain HF model has none).
        progress: show a tqdm progress bar.

    Returns:
        One :class:`ExpertCurvature` per layer, keyed by layer index.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe_bridge
        >>> curvature = estimate_curvature(tiny_moe_bridge(), ["the cat sat"])
        >>> c = curvature[0]
        >>> c.fisher[2].shape, c.kfac_in[0].shape, round(float(c.usage.sum()), 4)
        (torch.Size([4, 32, 64]), torch.Size([4, 32, 32]), 1.0)
    """
    runner = Runner(model)
    moe = find_moe_layers(model, layers)
    sums = {m.layer: _Sums(m, kfac) for m in moe}
    n_tokens = 0
    seen: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def capture(m: MoELayer, x: Tensor, indices, weights, output: Tensor) -> Tensor:
        # a zero added to the output: its gradient is the loss gradient there
        probe = torch.zeros_like(output, requires_grad=True)
        seen[m.layer] = (x.detach(), indices.detach(), weights.detach(), probe)
        return output + probe

    tokenizer = tokenizer or runner.info.tokenizer
    batches = calibration_batches(data, tokenizer, batch_size=batch_size)
    with runner.on_experts(moe, capture):
        for tokens, mask in tqdm(batches, disable=not progress, desc="curvature"):
            seen.clear()
            logits = runner.logits(tokens, mask, grad=True)
            tokens, mask = tokens.to(logits.device), mask.to(logits.device)
            keep = (mask[:, :-1] * mask[:, 1:]).bool()
            loss = F.cross_entropy(
                logits[:, :-1][keep].float(), tokens[:, 1:][keep], reduction="sum"
            )
            probes = [seen[m.layer][3] for m in moe]
            grads = torch.autograd.grad(loss, probes)
            n_tokens += int(keep.sum())
            real = mask.reshape(-1).bool()
            for m, grad in zip(moe, grads, strict=True):
                x, indices, weights, _ = seen[m.layer]
                full = _scatter(
                    torch.zeros(len(x), m.n_experts, device=x.device), weights, indices
                )[1]
                x, full, grad = x[real], full[real], grad[real]
                for start in range(0, len(x), _CHUNK):
                    part = slice(start, start + _CHUNK)
                    sums[m.layer].add(m, x[part], full[part], grad[part])
    seen.clear()

    scale = 1.0 / max(n_tokens, 1)
    result = {}
    for m in moe:
        s = sums[m.layer]
        result[m.layer] = ExpertCurvature(
            layer=m.layer,
            n_tokens=n_tokens,
            usage=(s.usage / s.usage.sum().clamp(min=1e-30)).float(),
            fisher=tuple(f * scale for f in s.fisher),
            kfac_in=(s.a_x * scale, s.a_x * scale, s.a_h * scale) if kfac else None,
            kfac_out=tuple(g * scale for g in s.g) if kfac else None,
        )
    return result
