"""How alike the experts of each MoE layer are, in weights and in outputs.

- Weight space: cosine similarity of task vectors ``tau_i = W_i - W_bar``
  relative to the mean expert ``W_bar`` (all three projections flattened
  together). Centring removes what every expert shares, so an upcycled
  layer's near-copies are told apart by what distinguishes them; the
  centred vectors sum to zero, so the cosines lean negative (``-1/(N-1)``
  for equally spread experts).
- Output space: linear CKA (Kornblith et al. 2019, eq. 5) between the outputs
  of experts ``i`` and ``j`` on the same calibration tokens, each expert run
  on every token whether or not the router chose it. CKA is computed from
  running sums of ``[d_model, d_model]`` cross-covariances, so memory grows
  with ``(n_experts * d_model)**2``, not with the number of tokens.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from controllens.camex.analysis import (
    Data,
    MoELayer,
    Runner,
    calibration_batches,
    find_moe_layers,
)

__all__ = ["ExpertSimilarity", "expert_similarity", "weight_cosine"]


@dataclass(frozen=True, kw_only=True)
class ExpertSimilarity:
    """Pairwise expert similarity per MoE layer.

    Attributes:
        layers: the MoE layers, in order.
        weight_cosine: cosine of task vectors relative to the mean expert.
        output_cka: linear CKA of expert outputs (None when not measured).
        n_tokens: calibration tokens behind ``output_cka``.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe
        >>> tokens = torch.tensor([[1, 14, 15, 16]])  # [batch, pos]
        >>> sim = expert_similarity(tiny_moe(), tokens)
        >>> sim.layers, sim.weight_cosine.shape, sim.output_cka.shape, sim.n_tokens
        ((0, 1), torch.Size([2, 4, 4]), torch.Size([2, 4, 4]), 4)
        >>> i, j = sim.most_similar(1)  # the closest pair of distinct experts
        >>> 0 <= i < j < 4
        True
        >>> expert_similarity(tiny_moe()).output_cka is None  # weights only
        True
    """

    layers: tuple[int, ...]
    weight_cosine: Float[Tensor, "layer expert expert"]
    output_cka: Float[Tensor, "layer expert expert"] | None
    n_tokens: int

    def most_similar(self, layer: int, by: str = "cka") -> tuple[int, int]:
        """The pair of distinct experts with the highest similarity at a layer.

        Args:
            layer: a layer of :attr:`layers`.
            by: ``"cka"`` (outputs) or ``"weights"`` (task-vector cosine).
        """
        table = self.output_cka if by == "cka" else self.weight_cosine
        if table is None or layer not in self.layers:
            raise ValueError(
                f"expected a measured layer in {self.layers} and by in "
                f"('cka', 'weights') with CKA measured, got {layer}, {by!r}"
            )
        values = table[self.layers.index(layer)].clone()
        values.fill_diagonal_(-torch.inf)
        flat = int(values.argmax())
        i, j = divmod(flat, values.shape[-1])
        return (min(i, j), max(i, j))


def weight_cosine(layer: MoELayer) -> Float[Tensor, "expert expert"]:
    """Cosine of the experts' task vectors relative to their mean.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe
        >>> from controllens.camex.analysis import find_moe_layers
        >>> cos = weight_cosine(find_moe_layers(tiny_moe())[0])
        >>> cos.shape, bool(torch.allclose(cos.diagonal(), torch.ones(4)))
        (torch.Size([4, 4]), True)
    """
    flat = torch.cat([w.flatten(1) for w in layer.projections()], dim=1).double()
    taus = flat - flat.mean(0)
    unit = taus / taus.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return (unit @ unit.T).float()


def expert_similarity(
    model: Any,
    data: Data | None = None,
    *,
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    progress: bool = False,
) -> ExpertSimilarity:
    """Weight-space cosine and, given calibration data, output-space CKA.

    Args:
        model: a TransformerBridge, nnsight ``LanguageModel`` or HF MoE model.
        data: calibration texts or token ids (None: weights only).
        layers: MoE layers (None: all).
        batch_size: rows per forward pass.
        tokenizer: overrides the model's (a plain HF model has none).
        progress: show a tqdm progress bar.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe_nnsight
        >>> sim = expert_similarity(tiny_moe_nnsight(), ["the cat sat"])
        >>> sim.output_cka.shape, sim.n_tokens
        (torch.Size([2, 4, 4]), 11)
    """
    moe = find_moe_layers(model, layers)
    cosine = torch.stack([weight_cosine(m) for m in moe])
    if data is None:
        return ExpertSimilarity(
            layers=tuple(m.layer for m in moe),
            weight_cosine=cosine,
            output_cka=None,
            n_tokens=0,
        )

    runner = Runner(model)
    n = moe[0].n_experts
    sums = {m.layer: torch.zeros(n * m.d_model, dtype=torch.float64) for m in moe}
    grams = {m.layer: torch.zeros(n * m.d_model, n * m.d_model).double() for m in moe}
    n_tokens = 0
    keep: Tensor | None = None

    def read(m: MoELayer, x: Tensor, *_: Tensor) -> None:
        with torch.no_grad():
            outputs = m.expert_outputs(x[keep].detach()).flatten(1).double().cpu()
        sums[m.layer] += outputs.sum(0)
        grams[m.layer] += outputs.T @ outputs

    tokenizer = tokenizer or runner.info.tokenizer
    batches = calibration_batches(data, tokenizer, batch_size=batch_size)
    with runner.on_experts(moe, read):
        for tokens, mask in tqdm(batches, disable=not progress, desc="similarity"):
            keep = mask.reshape(-1).bool().to(runner.device)
            n_tokens += int(keep.sum())
            runner.logits(tokens, mask)

    cka = torch.stack([_cka(sums[m.layer], grams[m.layer], n_tokens, n) for m in moe])
    return ExpertSimilarity(
        layers=tuple(m.layer for m in moe),
        weight_cosine=cosine,
        output_cka=cka.float(),
        n_tokens=n_tokens,
    )


def _cka(total: Tensor, gram: Tensor, n_tokens: int, n_experts: int) -> Tensor:
    """Linear CKA from running sums: ``||C_ij||^2 / (||C_ii|| ||C_jj||)``."""
    mean = total / max(n_tokens, 1)
    cov = gram - n_tokens * torch.outer(mean, mean)
    d = cov.shape[0] // n_experts
    blocks = cov.reshape(n_experts, d, n_experts, d).permute(0, 2, 1, 3)
    cross = blocks.pow(2).sum((-1, -2))
    self_norm = cross.diagonal().sqrt()
    return cross / torch.outer(self_norm, self_norm).clamp(min=1e-300)
