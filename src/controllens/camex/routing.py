"""Routing statistics of MoE layers, streamed over calibration text.

Routing is read through the model's hook points (``blocks.{l}.mlp.gate.hook_out``,
``hook_expert_weights``, ``hook_expert_indices`` on a TransformerBridge; the
router module's output in nnsight or a plain HF model), never by recomputing
the router. Only running sums are kept, so memory is bounded by one batch plus
a few ``[layer, expert, ...]`` tables, whatever the amount of text.
"""

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from controllens.camex.analysis import (
    Data,
    RoutingHooks,
    Runner,
    calibration_batches,
    find_moe_layers,
)

__all__ = ["RoutingStats", "routing_stats"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RoutingStats:
    """How an MoE model routed a set of tokens (padding left out).

    Attributes:
        layers: the MoE layers measured, in order (row ``i`` of every table
            is ``layers[i]``).
        n_tokens: tokens routed (per layer).
        top_k: experts chosen per token.
        counts: times each expert was among a token's top-k.
        weight_sums: summed routing weight of each expert.
        entropy: mean entropy (nats) of the router's softmax over all experts.
        co_selection: ``[i, j]``: tokens that chose both ``i`` and ``j``
            (the diagonal is ``counts``).
        top_tokens: per layer and expert, the most frequent token strings
            routed to it with their counts, most frequent first.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe
        >>> tokens = torch.tensor([[1, 14, 15, 16, 17]])  # [batch, pos]
        >>> stats = routing_stats(tiny_moe(), tokens)
        >>> stats.counts.shape, stats.co_selection.shape, stats.entropy.shape
        (torch.Size([2, 4]), torch.Size([2, 4, 4]), torch.Size([2]))
        >>> stats.counts.sum(-1).tolist()  # n_tokens * top_k per layer
        [10.0, 10.0]
        >>> stats.load.sum(-1).tolist()
        [1.0, 1.0]
    """

    layers: tuple[int, ...]
    n_tokens: int
    top_k: int
    counts: Float[Tensor, "layer expert"]
    weight_sums: Float[Tensor, "layer expert"]
    entropy: Float[Tensor, " layer"]
    co_selection: Float[Tensor, "layer expert expert"]
    top_tokens: tuple[tuple[tuple[tuple[str, int], ...], ...], ...]

    @property
    def load(self) -> Float[Tensor, "layer expert"]:
        """Share of the top-k slots each expert received (rows sum to 1)."""
        return self.counts / self.counts.sum(-1, keepdim=True).clamp(min=1)

    @property
    def load_cv(self) -> Float[Tensor, " layer"]:
        """Coefficient of variation of the load (0: perfectly balanced)."""
        mean = self.counts.mean(-1)
        return self.counts.std(-1, correction=0) / mean.clamp(min=1e-12)

    @property
    def normalized_entropy(self) -> Float[Tensor, " layer"]:
        """Router entropy over ``log(n_experts)`` (1: uniform routing)."""
        return self.entropy / math.log(self.counts.shape[-1])

    def to_dict(self) -> dict[str, Any]:
        """Plain Python lists and numbers, one entry per layer."""
        return {
            "layers": list(self.layers),
            "n_tokens": self.n_tokens,
            "load": self.load.tolist(),
            "load_cv": self.load_cv.tolist(),
            "entropy": self.entropy.tolist(),
            "co_selection": self.co_selection.tolist(),
            "top_tokens": [[list(e) for e in layer] for layer in self.top_tokens],
        }

    def to_frame(self) -> Any:
        """A pandas frame, one row per (layer, expert); needs pandas."""
        import pandas as pd

        rows = [
            {
                "layer": layer,
                "expert": e,
                "load": float(self.load[i, e]),
                "weight": float(self.weight_sums[i, e]) / max(self.n_tokens, 1),
                "top_tokens": " ".join(repr(t) for t, _ in self.top_tokens[i][e][:5]),
            }
            for i, layer in enumerate(self.layers)
            for e in range(self.counts.shape[-1])
        ]
        return pd.DataFrame(rows)


def routing_stats(
    model: Any,
    data: Data,
    *,
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    n_examples: int = 10,
    hooks: RoutingHooks | None = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> RoutingStats:
    """Streams calibration data through the model and tallies its routing.

    Args:
        model: a TransformerBridge, nnsight ``LanguageModel`` or HF MoE model.
        data: texts, a ``[n, pos]`` tensor of token ids, or an iterable of
            token-id batches (see :func:`calibration_batches`).
        layers: MoE layers to measure (None: all).
        batch_size: rows per forward pass.
        n_examples: token strings kept per expert in ``top_tokens``.
        hooks: where routing is read (default: transformers 5 names).
        tokenizer: overrides the model's (a plain HF model has none).
        progress: show a tqdm progress bar.

    Returns:
        The :class:`RoutingStats`.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe_bridge
        >>> stats = routing_stats(tiny_moe_bridge(), ["the cat sat", "on a mat"])
        >>> stats.layers, stats.n_tokens, stats.load.sum(-1).tolist()
        ((0, 1), 19, [1.0, 1.0])
    """
    runner = Runner(model)
    moe = find_moe_layers(model, layers)
    hooks = hooks or RoutingHooks()
    n_layers, n_experts = len(moe), moe[0].n_experts
    top_k = moe[0].top_k
    counts = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    weight_sums = torch.zeros_like(counts)
    entropy = torch.zeros(n_layers, dtype=torch.float64)
    co = torch.zeros(n_layers, n_experts, n_experts, dtype=torch.float64)
    # token tallies grow with the vocabulary seen, never with the text
    token_counts: list[dict[int, Tensor]] = [{} for _ in moe]
    n_tokens = 0

    tokenizer = tokenizer or runner.info.tokenizer
    batches = calibration_batches(data, tokenizer, batch_size=batch_size)
    for tokens, mask in tqdm(batches, disable=not progress, desc="routing"):
        routed = runner.routing(tokens, mask, moe, hooks)
        keep = mask.reshape(-1).bool().to(runner.device)
        ids = tokens.reshape(-1)[keep.cpu()]
        n_tokens += int(keep.sum())
        for i, m in enumerate(moe):
            logits, weights, indices = (t[keep].cpu() for t in routed[m.layer])
            chosen = torch.zeros(len(indices), n_experts, dtype=torch.float64)
            chosen.scatter_(1, indices.long(), 1.0)
            counts[i] += chosen.sum(0)
            weight_sums[i] += weights.double().sum(0)
            co[i] += chosen.T @ chosen
            probs = logits.double().softmax(-1)
            entropy[i] += -(probs * probs.clamp(min=1e-300).log()).sum()
            _tally(token_counts[i], ids, indices, n_experts)
    logger.info("routing statistics over %d tokens", n_tokens)

    decode = _decoder(tokenizer)
    top_tokens = tuple(
        tuple(_top(tallies, e, n_examples, decode) for e in range(n_experts))
        for tallies in token_counts
    )
    return RoutingStats(
        layers=tuple(m.layer for m in moe),
        n_tokens=n_tokens,
        top_k=top_k,
        counts=counts.float(),
        weight_sums=weight_sums.float(),
        entropy=(entropy / max(n_tokens, 1)).float(),
        co_selection=co.float(),
        top_tokens=top_tokens,
    )


def _tally(
    tallies: dict[int, Tensor], ids: Int[Tensor, " tokens"], indices: Tensor, n: int
) -> None:
    """Adds, per token id, how often each expert was chosen."""
    unique, inverse = ids.unique(return_inverse=True)
    table = torch.zeros(len(unique), n, dtype=torch.long)
    for slot in range(indices.shape[1]):
        table.index_put_(
            (inverse, indices[:, slot].long()),
            torch.ones(len(ids), dtype=torch.long),
            accumulate=True,
        )
    for token, row in zip(unique.tolist(), table, strict=True):
        if token in tallies:
            tallies[token] += row
        else:
            tallies[token] = row


def _top(tallies: dict[int, Tensor], expert: int, n: int, decode) -> tuple:
    ranked = sorted(tallies.items(), key=lambda kv: (-int(kv[1][expert]), kv[0]))
    return tuple(
        (decode(token), int(row[expert]))
        for token, row in ranked[:n]
        if int(row[expert]) > 0
    )


def _decoder(tokenizer: Any):
    if tokenizer is None:
        return str
    return lambda token: tokenizer.decode([token])
