"""Merge probes: what replacing sparse experts by merged ones costs.

A probe swaps an MoE layer's routed mixture ``sum_i s_i E_i(x)`` for one
merged expert per token, ``E_W(x)`` with ``W = merge(W_1..W_N; s)`` (SMEAR
style, CAMEx eq. 1-4), and measures the KL divergence of next-token
distributions from the original model's and the change of the loss on
held-out text. The router, attention and any shared expert run as before: only
the experts module's output is replaced (a forward hook), and ``s`` is the
model's own routing weights, renormalised to sum to 1 with the mixture's
total weight kept as a factor. Methods:

- ``"flat"``: ``W = sum_i s_i W_i``.
- ``"ties"``: ``W = W_bar + sum_i s_i ties(tau_i)`` with ``tau_i = W_i - W_bar``
  around the usage-weighted mean expert ``W_bar`` (sign election of
  :func:`~controllens.camex.merging.ties_elect`).
- ``"fisher"``: curvature-aware with the diagonal empirical Fisher (Fisher
  merging, Matena and Raffel 2022): ``W = sum_i s_i F_i W_i / sum_i s_i F_i``
  per entry and per token, i.e. ``M_i = (sum_j s_j F_j)^-1 F_i`` in CAMEx's
  notation. Exact for one-hot routing.
- ``"kfac"``: the same per-token merge with the Fisher replaced by the
  diagonal of its Kronecker-factored estimate, ``G_i[o, o] A_i[j, j]``.
  The off-diagonal parts of ``G_i`` and ``A_i`` are not used: the exact
  K-FAC merge solves ``sum_i s_i G_i W A_i = sum_i s_i G_i W_i A_i`` (a
  generalised Sylvester equation) per token, too costly here; the cheaper
  product-of-sums and static two-sided (CAMEx-form) approximations were tried
  and do not leave identical or one-hot-routed experts unchanged.

Merging a chosen group of experts into one (:func:`merge_group`) instead edits
the expert weights in place for the duration of the model's own forward pass.
"""

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
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
    next_token_terms,
)
from controllens.camex.curvature import ExpertCurvature
from controllens.camex.merging import ties_elect
from controllens.errors import MergeError

__all__ = [
    "PROBE_METHODS",
    "MergePlan",
    "ProbeCost",
    "ProbeReport",
    "merge_group",
    "merge_plan",
    "merge_probe",
]

Method = Literal["flat", "ties", "fisher", "kfac"]
#: Merge methods a probe can apply.
PROBE_METHODS: tuple[str, ...] = ("flat", "ties", "fisher", "kfac")
# entries of per-token merged matrices materialised at once by "fisher"
_FISHER_BUDGET = 2**24

Weights = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True, kw_only=True)
class ProbeCost:
    """The cost of one intervention on held-out text (means per token).

    Attributes:
        kl: KL(original || intervened) of next-token distributions, nats.
        loss: the intervened model's cross-entropy, nats.
        delta_loss: ``loss`` minus the original model's loss.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe
        >>> tokens = torch.tensor([[1, 14, 15, 16, 17]])  # [batch, pos]
        >>> cost = merge_group(tiny_moe(), tokens, layer=0, experts=(0, 1))
        >>> cost.kl > 0, cost.loss > 0, sorted(vars(cost))
        (True, True, ['delta_loss', 'kl', 'loss'])
    """

    kl: float
    loss: float
    delta_loss: float


@dataclass(frozen=True, kw_only=True)
class ProbeReport:
    """Costs of merge probes, per method and layer.

    Attributes:
        base_loss: the original model's loss, nats per token.
        n_tokens: predicted tokens measured.
        per_layer: ``per_layer[method][layer]``: one layer merged alone.
        together: ``together[method]``: all probed layers merged at once.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe
        >>> tokens = torch.tensor([[1, 14, 15, 16, 17]])  # [batch, pos]
        >>> report = merge_probe(tiny_moe(), tokens, methods=("flat", "ties"),
        ...                      layers=(0, 1), together=True)
        >>> report.n_tokens, sorted(report.per_layer["ties"]), sorted(report.together)
        (4, [0, 1], ['flat', 'ties'])
        >>> list(report.to_dict()["flat"])  # each layer alone, then both at once
        ['0', '1', 'all']
    """

    base_loss: float
    n_tokens: int
    per_layer: dict[str, dict[int, ProbeCost]]
    together: dict[str, ProbeCost] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers: ``{method: {layer or "all": {kl, loss, delta_loss}}}``."""
        out: dict[str, Any] = {"base_loss": self.base_loss, "n_tokens": self.n_tokens}
        for method, costs in self.per_layer.items():
            out[method] = {str(k): vars(v) for k, v in costs.items()}
            if method in self.together:
                out[method]["all"] = vars(self.together[method])
        return out


def _need(curvature: Mapping[int, ExpertCurvature] | None, m: MoELayer, what: str):
    if curvature is None or m.layer not in curvature:
        raise MergeError(
            f"expected curvature for layer {m.layer} with method {what!r}, got "
            f"{'none' if curvature is None else sorted(curvature)}; pass "
            "curvature=estimate_curvature(model, calibration_texts)"
        )
    c = curvature[m.layer]
    if what == "kfac" and c.kfac_in is None:
        raise MergeError(
            "expected Kronecker factors for method 'kfac', got an estimate made "
            "with kfac=False; rerun estimate_curvature with kfac=True"
        )
    return c


def _usage(m: MoELayer, curvature: Mapping[int, ExpertCurvature] | None) -> Tensor:
    if curvature is not None and m.layer in curvature:
        return curvature[m.layer].usage.double()
    return torch.full((m.n_experts,), 1.0 / m.n_experts, dtype=torch.float64)


def _curvature(
    m: MoELayer,
    method: str,
    curvature: Mapping[int, ExpertCurvature] | None,
    damping: float,
) -> list[Tensor]:
    """Per-entry curvature ``[expert, out, in]`` of each projection, damped.

    ``"kfac"`` uses the diagonal of ``G_i kron A_i``, i.e.
    ``G_i[o, o] A_i[j, j]``.
    """
    c = _need(curvature, m, method)
    if method == "fisher":
        tensors = [f.double() for f in c.fisher]
    else:
        tensors = [
            g.double().diagonal(dim1=1, dim2=2)[:, :, None]
            * a.double().diagonal(dim1=1, dim2=2)[:, None, :]
            for a, g in zip(c.kfac_in, c.kfac_out, strict=True)
        ]
    return [t + damping * t.mean().clamp(min=1e-30) for t in tensors]


def _effective(
    m: MoELayer,
    method: str,
    curvature: Mapping[int, ExpertCurvature] | None,
    ties_density: float | None,
    damping: float,
) -> Weights:
    """Static experts whose router-weighted sum is the merged weight."""
    weights = tuple(w.double() for w in m.projections())
    if method == "flat":
        return weights
    p = _usage(m, curvature)
    bases = [torch.einsum("e,eoi->oi", p, w) for w in weights]
    if method == "ties":
        return tuple(
            b + ties_elect(w - b, ties_density)
            for w, b in zip(weights, bases, strict=True)
        )
    raise MergeError(f"expected a static merge method, got {method!r}")


def _route(
    indices: Tensor, weights: Tensor, n_experts: int, top_k: int | None
) -> tuple[Tensor, Tensor]:
    """Routing weights renormalised to sum to 1, and the factor they had."""
    full = _scatter(torch.zeros(len(indices), n_experts), weights.cpu(), indices.cpu())
    full = full[1].double()
    if top_k is not None:
        kept = full.topk(top_k, dim=-1)
        full = torch.zeros_like(full).scatter(-1, kept.indices, kept.values)
        total = torch.ones(len(full), dtype=full.dtype)
    else:
        total = full.sum(-1)
    return full / full.sum(-1, keepdim=True).clamp(min=1e-30), total


def _merged_output(
    m: MoELayer, x: Tensor, s: Tensor, weights: Weights, act
) -> Float[Tensor, "tokens d_model"]:
    """``E_W(x)`` with ``W = sum_i s_i W_i``, without forming ``W`` per token."""
    gate, up, down = weights
    g = torch.einsum("te,tem->tm", s, torch.einsum("td,emd->tem", x, gate))
    u = torch.einsum("te,tem->tm", s, torch.einsum("td,emd->tem", x, up))
    h = act(g) * u
    return torch.einsum("te,ted->td", s, torch.einsum("tm,edm->ted", h, down))


def _fisher_terms(
    m: MoELayer, fishers: list[Tensor]
) -> list[tuple[Tensor, Tensor, tuple[int, int]]]:
    """Per projection: ``F * W`` and ``F`` as ``[expert, out * in]`` (float32)."""
    terms = []
    for f, w in zip(fishers, m.projections(), strict=True):
        shape = (w.shape[1], w.shape[2])
        f = f.float()
        terms.append(((f * w.float()).flatten(1), f.flatten(1), shape))
    return terms


def _fisher_output(m: MoELayer, x: Tensor, s: Tensor, terms: list, act) -> Tensor:
    """Per-token Fisher merge, materialised in chunks of tokens.

    float32: the merged matrices are the memory-bound part of the probe.
    """
    x, s = x.float(), s.float()
    chunk = max(1, _FISHER_BUDGET // (m.d_mlp * m.d_model))
    out = []
    for start in range(0, len(x), chunk):
        xs, ss = x[start : start + chunk], s[start : start + chunk]
        merged = [
            ((ss @ fw) / (ss @ f)).reshape(len(ss), *shape) for fw, f, shape in terms
        ]
        h = act(torch.einsum("tmd,td->tm", merged[0], xs)) * torch.einsum(
            "tmd,td->tm", merged[1], xs
        )
        out.append(torch.einsum("tdm,tm->td", merged[2], h))
    return torch.cat(out).double()


def _probe_hook(
    method: str,
    curvature: Mapping[int, ExpertCurvature] | None,
    top_k: int | None,
    ties_density: float | None,
    damping: float,
    layers: Sequence[MoELayer],
):
    if method not in PROBE_METHODS:
        raise MergeError(f"expected a method in {PROBE_METHODS}, got {method!r}")
    static = {}
    for m in layers:
        if method in ("fisher", "kfac"):
            curv = _curvature(m, method, curvature, damping)
            static[m.layer] = _fisher_terms(m, curv)
        else:
            static[m.layer] = _effective(m, method, curvature, ties_density, damping)

    def hook(m: MoELayer, x: Tensor, indices, weights, output: Tensor) -> Tensor:
        s, total = _route(indices, weights, m.n_experts, top_k)
        xd = x.detach().cpu().double()
        if method in ("fisher", "kfac"):
            y = _fisher_output(m, xd, s, static[m.layer], m.act_fn)
        else:
            y = _merged_output(m, xd, s, static[m.layer], m.act_fn)
        return (total[:, None] * y).to(output.dtype).to(output.device)

    return hook


class _Tally:
    def __init__(self) -> None:
        self.kl = self.loss = self.base = 0.0
        self.n = 0

    def add(self, terms: tuple[float, float, float, int]) -> None:
        kl, base, loss, n = terms
        self.kl, self.base, self.loss, self.n = (
            self.kl + kl,
            self.base + base,
            self.loss + loss,
            self.n + n,
        )

    def cost(self) -> ProbeCost:
        n = max(self.n, 1)
        return ProbeCost(
            kl=self.kl / n, loss=self.loss / n, delta_loss=(self.loss - self.base) / n
        )


def merge_probe(
    model: Any,
    data: Data,
    *,
    methods: str | Sequence[str] = ("flat",),
    layers: int | Iterable[int] | None = None,
    together: bool = False,
    curvature: Mapping[int, ExpertCurvature] | None = None,
    top_k: int | None = None,
    ties_density: float | None = None,
    damping: float = 1e-3,
    batch_size: int = 4,
    tokenizer: Any = None,
    progress: bool = False,
) -> ProbeReport:
    """Replaces routed mixtures by merged experts and measures the cost.

    Args:
        model: a TransformerBridge, nnsight ``LanguageModel`` or HF MoE model.
        data: held-out texts or token ids.
        methods: merge methods (see :data:`PROBE_METHODS`).
        layers: MoE layers, each probed alone (None: all).
        together: also probe all of them merged at once.
        curvature: from :func:`~controllens.camex.curvature.estimate_curvature`
            on calibration data; needed by ``"fisher"`` and ``"kfac"``, and
            used by ``"ties"`` for the usage-weighted mean expert.
        top_k: keep only each token's ``top_k`` largest routing weights,
            renormalised to sum to 1 (None: the model's routing as it is).
        ties_density: trimming density of ``"ties"`` (None: no trimming).
        damping: relative damping of Fisher entries and Kronecker factors.
        batch_size: rows per forward pass.
        tokenizer: overrides the model's (a plain HF model has none).
        progress: show a tqdm progress bar.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe_bridge
        >>> report = merge_probe(tiny_moe_bridge(), ["the cat sat on the mat"])
        >>> sorted(report.per_layer["flat"]), report.per_layer["flat"][0].kl > 0
        ([0, 1], True)
    """
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    runner = Runner(model)
    moe = find_moe_layers(model, layers)
    configs: list[tuple[str, str | int, tuple[MoELayer, ...]]] = []
    hooks = {}
    for method in methods:
        hooks[method] = _probe_hook(
            method, curvature, top_k, ties_density, damping, moe
        )
        configs += [(method, m.layer, (m,)) for m in moe]
        if together:
            configs.append((method, "all", moe))
    tallies = {(method, key): _Tally() for method, key, _ in configs}
    base = _Tally()

    tokenizer = tokenizer or runner.info.tokenizer
    batches = calibration_batches(data, tokenizer, batch_size=batch_size)
    for tokens, mask in tqdm(batches, disable=not progress, desc="merge probes"):
        reference = runner.logits(tokens, mask).detach()
        tokens, mask = tokens.to(reference.device), mask.to(reference.device)
        base.add(next_token_terms(reference, reference, tokens, mask))
        for method, key, chosen in configs:
            with runner.on_experts(chosen, hooks[method]):
                logits = runner.logits(tokens, mask).detach()
            tallies[method, key].add(next_token_terms(reference, logits, tokens, mask))

    return ProbeReport(
        base_loss=base.cost().loss,
        n_tokens=base.n,
        per_layer={
            method: {
                key: tallies[method, key].cost()
                for mm, key, _ in configs
                if mm == method and key != "all"
            }
            for method in methods
        },
        together={
            method: tallies[method, "all"].cost()
            for method in methods
            if (method, "all") in tallies
        },
    )


def _group_weight(
    m: MoELayer,
    group: Sequence[int],
    method: str,
    curvature: Mapping[int, ExpertCurvature] | None,
    damping: float,
) -> Weights:
    """One merged weight per projection for the experts of ``group``."""
    index = torch.tensor(list(group))
    weights = [w.double()[index] for w in m.projections()]
    if method == "flat":
        p = _usage(m, curvature)[index]
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / len(p))
        return tuple(torch.einsum("e,eoi->oi", p, w) for w in weights)
    if method in ("fisher", "kfac"):
        fishers = [f[index] for f in _curvature(m, method, curvature, damping)]
        return tuple(
            (f * w).sum(0) / f.sum(0) for f, w in zip(fishers, weights, strict=True)
        )
    raise MergeError(
        f"expected a group merge method in ('flat', 'fisher', 'kfac'), got {method!r}"
    )


def _check_groups(m: MoELayer, groups: Sequence[Sequence[int]]) -> None:
    members = [e for group in groups for e in group]
    bad = [e for e in members if not 0 <= e < m.n_experts]
    if bad or len(set(members)) != len(members) or any(len(g) < 1 for g in groups):
        raise MergeError(
            f"expected disjoint, non-empty groups of expert indices in "
            f"[0, {m.n_experts}) at layer {m.layer}, got {list(map(list, groups))}"
        )


def _measure_edits(
    runner: Runner,
    edits: Mapping[MoELayer, Weights],
    data: Data,
    tokenizer: Any,
    batch_size: int,
) -> ProbeCost:
    tally = _Tally()
    batches = calibration_batches(data, tokenizer, batch_size=batch_size)
    for tokens, mask in batches:
        reference = runner.logits(tokens, mask).detach()
        with contextlib.ExitStack() as stack:
            for m, weights in edits.items():
                stack.enter_context(m.replaced(*weights))
            logits = runner.logits(tokens, mask).detach()
        tokens, mask = tokens.to(reference.device), mask.to(reference.device)
        tally.add(next_token_terms(reference, logits, tokens, mask))
    return tally.cost()


def _edited(
    m: MoELayer,
    groups: Sequence[Sequence[int]],
    method: str,
    curvature: Mapping[int, ExpertCurvature] | None,
    damping: float,
) -> Weights:
    stacks = [w.clone() for w in m.projections()]
    for group in groups:
        if len(group) < 2:
            continue
        merged = _group_weight(m, group, method, curvature, damping)
        for stack, w in zip(stacks, merged, strict=True):
            stack[list(group)] = w.to(stack.dtype)
    return tuple(stacks)


def merge_group(
    model: Any,
    data: Data,
    *,
    layer: int,
    experts: Sequence[int],
    method: str = "flat",
    curvature: Mapping[int, ExpertCurvature] | None = None,
    damping: float = 1e-3,
    batch_size: int = 4,
    tokenizer: Any = None,
) -> ProbeCost:
    """Merges a group of experts into one and measures the cost.

    Every expert of the group gets the merged weights (flat: usage-weighted
    mean; ``"fisher"`` / ``"kfac"``: ``sum_i F_i W_i / sum_i F_i`` with the
    diagonal or Kronecker-factored Fisher), so the router still
    chooses among the old indices but the group answers as one expert. The
    model's own forward pass runs on the edited weights, which are restored
    afterwards.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe_bridge
        >>> cost = merge_group(tiny_moe_bridge(), ["the cat sat"], layer=0,
        ...                    experts=(0, 1))
        >>> cost.kl > 0
        True
    """
    runner = Runner(model)
    (m,) = find_moe_layers(model, layer)
    _check_groups(m, [tuple(experts)])
    edit = _edited(m, [tuple(experts)], method, curvature, damping)
    tokenizer = tokenizer or runner.info.tokenizer
    return _measure_edits(runner, {m: edit}, data, tokenizer, batch_size)


@dataclass(frozen=True, kw_only=True)
class MergePlan:
    """Which experts to merge per layer, with predicted and measured costs.

    Attributes:
        budget: experts kept per layer.
        method: how groups are merged.
        groups: per layer, the groups of old expert indices (singletons kept).
        predicted: per layer, the predicted loss increase (nats per token) from
            the second-order expansion with the diagonal Fisher,
            ``1/2 sum_i sum F_i (W_G - W_i)**2``.
        measured: per layer, the cost of applying that layer's plan alone.
        together: the cost of applying every layer's plan at once.

    Examples:
        >>> from controllens.camex.curvature import estimate_curvature
        >>> from controllens.camex.tiny import tiny_moe
        >>> model, tokens = tiny_moe(), torch.tensor([[1, 14, 15, 16, 17]])
        >>> curvature = estimate_curvature(model, tokens, kfac=False)
        >>> plan = merge_plan(model, None, curvature, budget=2, layers=0)
        >>> len(plan.groups[0]), sorted(e for g in plan.groups[0] for e in g)
        (2, [0, 1, 2, 3])
        >>> plan.predicted[0] >= 0, plan.measured, plan.together  # no data
        (True, {}, None)
    """

    budget: int
    method: str
    groups: dict[int, tuple[tuple[int, ...], ...]]
    predicted: dict[int, float]
    measured: dict[int, ProbeCost]
    together: ProbeCost | None


def _predicted(
    m: MoELayer, group: tuple[int, ...], method: str, c: ExpertCurvature, damping: float
) -> float:
    if len(group) < 2:
        return 0.0
    merged = _group_weight(m, group, method, {m.layer: c}, damping)
    index = list(group)
    total = 0.0
    for f, w, wg in zip(c.fisher, m.projections(), merged, strict=True):
        total += 0.5 * float((f.double()[index] * (wg - w.double()[index]) ** 2).sum())
    return total


def merge_plan(
    model: Any,
    data: Data | None,
    curvature: Mapping[int, ExpertCurvature],
    *,
    budget: int,
    method: str = "fisher",
    layers: int | Iterable[int] | None = None,
    damping: float = 1e-3,
    batch_size: int = 4,
    tokenizer: Any = None,
) -> MergePlan:
    """Greedy agglomerative merging down to ``budget`` experts per layer.

    At each step the two groups whose union adds the least predicted loss
    (second order, diagonal Fisher) are merged. With held-out ``data`` each
    layer's plan is then applied (alone, and all layers together) and its KL
    and loss change measured.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe_bridge
        >>> from controllens.camex.curvature import estimate_curvature
        >>> bridge = tiny_moe_bridge()
        >>> curvature = estimate_curvature(bridge, ["the cat sat"], kfac=False)
        >>> plan = merge_plan(bridge, ["a mat"], curvature, budget=3)
        >>> [len(groups) for groups in plan.groups.values()]
        [3, 3]
    """
    runner = Runner(model)
    moe = find_moe_layers(model, layers)
    groups, predicted, edits = {}, {}, {}
    for m in moe:
        if not 1 <= budget <= m.n_experts:
            raise MergeError(
                f"expected a budget in [1, {m.n_experts}] experts, got {budget}"
            )
        c = _need(curvature, m, method)
        clusters = [(e,) for e in range(m.n_experts)]
        cost = {cl: 0.0 for cl in clusters}
        while len(clusters) > budget:
            best = None
            for i in range(len(clusters)):
                for j in range(i + 1, len(clusters)):
                    union = tuple(sorted(clusters[i] + clusters[j]))
                    if union not in cost:
                        cost[union] = _predicted(m, union, method, c, damping)
                    extra = cost[union] - cost[clusters[i]] - cost[clusters[j]]
                    if best is None or extra < best[0]:
                        best = (extra, i, j, union)
            _, i, j, union = best
            clusters = [cl for k, cl in enumerate(clusters) if k not in (i, j)]
            clusters.append(union)
        groups[m.layer] = tuple(sorted(clusters))
        predicted[m.layer] = sum(cost[cl] for cl in clusters)
        edits[m] = _edited(m, clusters, method, curvature, damping)

    measured, together = {}, None
    if data is not None:
        tokenizer = tokenizer or runner.info.tokenizer
        for m in moe:
            measured[m.layer] = _measure_edits(
                runner, {m: edits[m]}, data, tokenizer, batch_size
            )
        together = _measure_edits(runner, edits, data, tokenizer, batch_size)
    return MergePlan(
        budget=budget,
        method=method,
        groups=groups,
        predicted=predicted,
        measured=measured,
        together=together,
    )
