"""One steering specification, shared by the TransformerLens and nnsight back ends.

A :class:`Steering` holds the error signal r(k) of each steered layer, the
controller gains, the strength alpha, the token positions to act on and the
:class:`~controllens.operators.Operator` through which the control signal u(k)
enters the activation (addition, ablation, transport, rotation or per-token
feedback). The same object steers a TransformerBridge (:meth:`Steering.hooks`,
:meth:`Steering.apply`) and an nnsight model (:meth:`Steering.intervene`) the
same way. :func:`compose` steers several concepts at once.
"""

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from controllens.adapters import (
    check_hook_point,
    inspect_model,
    layer_index,
    resolve_layers,
)
from controllens.controllers import Gains, control_signal
from controllens.errors import (
    HookPointError,
    LayerError,
    MetadataMismatchError,
    VectorError,
)
from controllens.operators import Ablate, Add, Feedback, Operator, Rotate, Transport

__all__ = ["METHODS", "Composed", "Positions", "Steering", "Where", "compose"]

#: Steering methods of :meth:`Steering.from_means`: ``"add"`` (ActAdd /
#: mean difference), ``"caa"`` (addition of means measured on the answer
#: letter), ``"pca"`` (addition of the PCA / RepE signal), ``"ablate"``,
#: ``"ablate_add"``, ``"transport"`` (Mean-AcT), ``"rotate"`` (angular
#: steering) and ``"feedback"`` (closed-loop, per token).
METHODS: tuple[str, ...] = (
    "add",
    "caa",
    "pca",
    "ablate",
    "ablate_add",
    "transport",
    "rotate",
    "feedback",
)

#: Which tokens are steered: every token, the prompt only, generated tokens
#: only, or tokens from a given position of the text on (0 is the first real
#: token, padding excluded).
Positions = Literal["all", "prompt", "generated"] | int
_NAMED_POSITIONS = ("all", "prompt", "generated")


def _check_positions(positions: Any) -> None:
    if isinstance(positions, bool):
        raise TypeError(f"positions must be a name or an int, got {positions!r}.")
    if isinstance(positions, int):
        if positions < 0:
            raise ValueError(
                f"positions={positions}: a start position counts from the first "
                "real token and must be >= 0."
            )
        return
    if positions not in _NAMED_POSITIONS:
        raise ValueError(
            f"Unknown positions {positions!r}; valid choices: "
            f"{', '.join(map(repr, _NAMED_POSITIONS))} or an int start position."
        )


class Where(NamedTuple):
    """Where the tokens of one forward call sit in their sequences.

    Attributes:
        columns: Padded column of each token of the call ``[pos]`` (with a KV
            cache, the new token's column is the length of the cache).
        first_real: Column of the first real (non-padding) token of each row.
        prompt_len: Padded width of the prompt: later columns were generated.
    """

    columns: Int[Tensor, " pos"]
    first_real: Int[Tensor, " batch"]
    prompt_len: int


class _BackEnds:
    """The entry points to both back ends, shared by Steering and Composed."""

    def hooks(
        self, model: Any, *, attention_mask: Int[Tensor, "batch pos"] | None = None
    ) -> list[tuple[str, Callable]]:
        """TransformerLens ``(hook_name, hook_fn)`` pairs for this steering.

        See :func:`controllens.hooks.steering_hooks`.
        """
        from controllens.hooks import steering_hooks

        return steering_hooks(self, model, attention_mask=attention_mask)

    @contextmanager
    def apply(
        self, model: Any, *, attention_mask: Int[Tensor, "batch pos"] | None = None
    ) -> Iterator[Any]:
        """Steer a TransformerLens model inside a ``with`` block.

        The hooks are removed on exit, also when the block raises.

        Examples:
            >>> from controllens.testing import tiny_bridge
            >>> model = tiny_bridge()
            >>> steering = Steering(errors=torch.randn(1, model.cfg.d_model),
            ...                     layers=(1,), alpha=4.0)
            >>> tokens = torch.tensor([[1, 2, 3]])
            >>> with steering.apply(model):
            ...     steered = model(tokens)
            >>> bool((steered != model(tokens)).any())
            True
        """
        from controllens.hooks import applied

        with applied(self, model, attention_mask=attention_mask):
            yield model

    def intervene(self, model: Any, tracer: Any | None = None) -> None:
        """Apply this steering inside an nnsight ``trace`` or ``generate`` block.

        See :func:`controllens.interventions.steer`.
        """
        from controllens.interventions import steer

        steer(self, model, tracer)


@dataclass(frozen=True, kw_only=True, eq=False)
class Steering(_BackEnds):
    """What to change, where, and with which controller.

    Attributes:
        errors: The error signal r(k) of each steered layer, in the order of
            ``layers``: typically ``mu_target(k) - mu_source(k)``.
        layers: The model layers steered, one per row of ``errors``. Rows are
            reordered into layer order, whatever order is given.
        gains: Controller gains; the default ``Gains(kp=1)`` is ActAdd.
        alpha: Overall strength: the edit is ``x <- x + alpha * u(k)``.
        positions: Which tokens to steer (see :data:`Positions`).
        hook_point: ``"resid_post"`` (after the block, the default) or
            ``"resid_pre"`` (before it).
        model_name: Name of the model the errors were measured on, checked
            against the model being steered when known.
        n_layers: Number of layers of that model, used to resolve negative
            layer indices. None: every index must be non-negative.
        operator: How u(k) enters the activation (see
            :mod:`controllens.operators`); the default :class:`Add` is
            ``x <- x + alpha u(k)``.

    Examples:
        >>> r = torch.randn(3, 16)
        >>> steering = Steering(errors=r, layers=(2, 0, 1), gains=Gains.p(1.0))
        >>> steering.layers
        (0, 1, 2)
        >>> torch.equal(steering.control()[0], r[1])
        True
    """

    errors: Float[Tensor, "layer d_model"] = field(repr=False)
    layers: tuple[int, ...] | int
    gains: Gains = field(default_factory=Gains)
    alpha: float = 1.0
    positions: Positions = "all"
    hook_point: str = "resid_post"
    model_name: str | None = None
    n_layers: int | None = None
    operator: Operator = field(default_factory=Add)

    def __post_init__(self) -> None:
        errors = self.errors
        if not isinstance(errors, Tensor) or errors.ndim != 2:
            shape = tuple(errors.shape) if isinstance(errors, Tensor) else type(errors)
            raise VectorError(
                f"Expected errors as a tensor of shape [layer, d_model], got {shape}."
            )
        if not errors.is_floating_point():
            raise VectorError(f"Expected a floating-point tensor, got {errors.dtype}.")
        given = self.layers
        if isinstance(given, numbers.Integral):
            given = (given,)
        layers = [layer_index(layer, self.n_layers) for layer in given]
        if not layers:
            raise LayerError("Expected at least one steered layer, got none.")
        if len(set(layers)) != len(layers):
            raise LayerError(f"Each layer may appear once, got {tuple(given)}.")
        if len(layers) != errors.shape[0]:
            raise VectorError(
                f"Expected one row of errors per layer: {len(layers)} layers, "
                f"{errors.shape[0]} rows."
            )
        bad = [
            layer
            for layer, row in zip(layers, errors, strict=True)
            if not row.isfinite().all()
        ]
        if bad:
            raise VectorError(
                f"The errors of layers {bad} contain NaN or infinite values; "
                "re-estimate them (check the data and the model's dtype)."
            )
        if not isinstance(self.gains, Gains):
            raise TypeError(f"Expected gains as a Gains, got {type(self.gains)}.")
        alpha = self.alpha
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = alpha.item()
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha)
        ):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}.")
        object.__setattr__(self, "alpha", float(alpha))
        _check_positions(self.positions)
        check_hook_point(self.hook_point)

        # a private copy in layer order: the caller's tensor is never aliased
        order = sorted(range(len(layers)), key=layers.__getitem__)
        object.__setattr__(self, "errors", errors.detach()[order].clone())
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        # u(k) without alpha, computed once: the back ends read it every pass
        object.__setattr__(self, "_signals", control_signal(self.errors, self.gains))
        # what operators derive from this (immutable) steering, per layer,
        # dtype and device: directions, planes, shifts
        object.__setattr__(self, "_derived", {})
        if not isinstance(self.operator, Operator):
            raise TypeError(
                f"Expected operator as a controllens.operators.Operator, got "
                f"{type(self.operator).__name__}."
            )
        self.operator.check(self)

    @classmethod
    def from_means(
        cls,
        means: Any,
        *,
        layers: int | Iterable[int] | None = None,
        method: str = "add",
        angle: float | None = None,
        one_sided: bool = True,
        token_ki: float = 0.0,
        **kwargs: Any,
    ) -> "Steering":
        """Steer with the error signal of contrastive means, by any method.

        Args:
            means: A :class:`~controllens.vectors.ContrastiveMeans`. The
                ``"pca"``, ``"transport"`` and ``"rotate"`` methods need means
                measured with ``moments=True``.
            layers: The layers to steer (a subset of ``means.layers``; negative
                indices count from the end); None for all of them.
            method: One of :data:`METHODS`. ``"add"``, ``"caa"`` and ``"pca"``
                add ``alpha u(k)``, on r(k) = mu_target(k) - mu_source(k)
                (``"caa"``: measured on the answer letter, so
                ``aggregation="last"``; ``"pca"``: r(k) projected on the first
                principal component of paired differences). The others pick
                the operator of :mod:`controllens.operators`.
            angle: Rotation angle in degrees for ``"rotate"``.
            one_sided: For ``"feedback"``: push only tokens short of the
                set-point (the target mean's projection).
            token_ki: For ``"feedback"``: integral gain across the earlier
                tokens of each sequence.
            **kwargs: Other :class:`Steering` fields (gains, alpha, positions).

        Examples:
            >>> from controllens.vectors import ContrastiveMeans
            >>> means = ContrastiveMeans(
            ...     mu_target=torch.randn(2, 8), mu_source=torch.randn(2, 8),
            ...     layers=(0, 1), aggregation="mean", model_name="toy",
            ...     n_layers=2, d_model=8, n_target=4, n_source=4)
            >>> Steering.from_means(means, method="ablate").operator
            Ablate(add=False)
        """
        if method not in METHODS:
            raise ValueError(
                f"Unknown steering method {method!r}; valid choices: "
                f"{', '.join(map(repr, METHODS))}."
            )
        if "operator" in kwargs:
            raise TypeError(
                "Pass either method= or operator=, not both: from_means builds "
                "the operator of the method. Use Steering(...) for your own."
            )
        available = tuple(means.layers)
        chosen = available if layers is None else resolve_layers(layers, means.n_layers)
        missing = [k for k in chosen if k not in available]
        if missing:
            raise LayerError(
                f"Layers {missing} have no measured error; the means cover "
                f"layers {available}. Re-estimate with those layers."
            )
        rows = [available.index(k) for k in chosen]
        if method == "caa" and means.aggregation != "last":
            raise VectorError(
                "CAA steers with the activation difference at the answer letter: "
                "measure the means of controllens.data.load_caa(...) with "
                f"aggregation='last', got aggregation={means.aggregation!r}."
            )
        errors = (means.pca_r if method == "pca" else means.r)[rows]
        if method == "rotate" and angle is None:
            raise ValueError(
                "method='rotate' needs angle=, in degrees within [-180, 180]."
            )
        operator = _method_operator(
            method,
            means,
            rows,
            chosen,
            errors,
            angle=angle,
            one_sided=one_sided,
            token_ki=token_ki,
        )
        return cls(
            errors=errors,
            layers=chosen,
            hook_point=means.hook_point,
            model_name=means.model_name,
            n_layers=means.n_layers,
            operator=operator,
            **kwargs,
        )

    def replace(self, **changes: Any) -> "Steering":
        """A copy with some fields changed (``gains``, ``alpha``, ...)."""
        return replace(self, **changes)

    @property
    def d_model(self) -> int:
        """Width of the steered activations."""
        return self.errors.shape[-1]

    @property
    def is_identity(self) -> bool:
        """Whether this steering never changes any activation."""
        return self.operator.is_identity(self)

    @property
    def needs_positions(self) -> bool:
        """Whether the back ends must locate each token in its sequence."""
        return self.positions != "all" or self.operator.needs_positions

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per ``key`` for this steering.

        Operators keep what they derive from the steering's fixed data (unit
        directions, rotation planes, casts to the activation's dtype and
        device) here, so that each forward pass does not redo it.

        Examples:
            >>> steering = Steering(errors=torch.ones(1, 2), layers=(0,))
            >>> steering.cached(("norm", 0), lambda: steering.errors[0].norm())
            tensor(1.4142)
        """
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = compute()
        return value

    def control(self) -> Float[Tensor, "layer d_model"]:
        """The open-loop signal ``alpha * u(k)`` of each steered layer, in layer
        order (what :class:`~controllens.operators.Add` adds)."""
        return self.alpha * self._signals

    def edit(
        self,
        layer: int,
        activation: Float[Tensor, "batch pos d_model"],
        where: Where | None,
        state: dict[Any, Any],
    ) -> Float[Tensor, "batch pos d_model"]:
        """The steered activation of ``layer`` in one forward pass.

        This is what both back ends call at each steered layer.

        Args:
            layer: A steered model layer.
            activation: Its activation at the steering's hook point.
            where: The tokens' positions, when :attr:`needs_positions`.
            state: Shared by the layers of one forward pass, empty at its
                first steered layer but for ``state["memory"]``, which the
                back ends keep across the passes of one sequence (the KV-cache
                steps of a generation).

        Examples:
            >>> steering = Steering(errors=torch.ones(1, 4), layers=(3,), alpha=2.0)
            >>> steering.edit(3, torch.zeros(1, 2, 4), None, {})[0, 0]
            tensor([2., 2., 2., 2.])
        """
        mask = None
        if where is not None:
            columns = where.columns.to(activation.device)
            first_real = where.first_real.to(activation.device)
            if self.operator.needs_positions:
                state["first"] = columns[None, :] == first_real[:, None]
                state["pad"] = columns[None, :] < first_real[:, None]
            mask = position_mask(
                self.positions,
                columns=columns,
                first_real=first_real,
                prompt_len=where.prompt_len,
            )
            if not self.operator.edits_first_token:
                # the attention sink: norm ~100x the others, never turned,
                # ablated or rescaled
                keep = (columns[None, :] != first_real[:, None]).unsqueeze(-1)
                mask = keep if mask is None else mask & keep
        row = self.layers.index(layer)
        steered = self.operator.edit(
            activation,
            layer=layer,
            control=self._signals[row],
            steering=self,
            state=state,
        )
        return steered if mask is None else torch.where(mask, steered, activation)

    def check_model(self, model: Any) -> None:
        """Raise a clear error unless this steering fits ``model``."""
        info = inspect_model(model)
        if info.d_model != self.d_model:
            raise VectorError(
                f"The steering vectors have width {self.d_model} but the model's "
                f"d_model is {info.d_model}: they were made for another model. "
                "Re-estimate them on this model."
            )
        if self.n_layers is not None and self.n_layers != info.n_layers:
            made_for = f" ({self.model_name})" if self.model_name else ""
            raise MetadataMismatchError(
                f"The steering was made for a model with {self.n_layers} "
                f"layers{made_for}; this model has {info.n_layers}."
            )
        if self.layers[-1] >= info.n_layers:
            raise LayerError(
                f"Layer {self.layers[-1]} is outside the model, which has "
                f"{info.n_layers} layers (0..{info.n_layers - 1})."
            )


def position_mask(
    positions: Positions,
    *,
    columns: Int[Tensor, " pos"],
    first_real: Int[Tensor, " batch"],
    prompt_len: int,
) -> Bool[Tensor, "batch pos 1"] | None:
    """Which tokens of the current forward call to steer; None means all.

    Args:
        positions: The steering's positions rule.
        columns: Padded column of each token of the call (with a KV cache, the
            new token's column is the length of the cache).
        first_real: Column of the first real (non-padding) token of each row.
        prompt_len: Padded width of the prompt: later columns were generated.

    Examples:
        >>> position_mask(2, columns=torch.arange(4),
        ...               first_real=torch.tensor([0, 1]), prompt_len=4)[..., 0]
        tensor([[False, False,  True,  True],
                [False, False, False,  True]])
    """
    if positions == "all":
        return None
    if positions == "prompt":
        mask = (columns < prompt_len).expand(first_real.shape[0], -1)
    elif positions == "generated":
        mask = (columns >= prompt_len).expand(first_real.shape[0], -1)
    else:
        mask = columns[None, :] - first_real[:, None] >= positions
    return mask.unsqueeze(-1)


def _moment(means: Any, name: str, method: str) -> Tensor:
    value = getattr(means, name, None)
    if value is None:
        raise VectorError(
            f"method={method!r} needs {name} of the contrastive means, which "
            "were measured without it: re-run contrastive_means(..., "
            "moments=True) (or sequential_steering with that method)."
        )
    return value


def _method_operator(
    method: str,
    means: Any,
    rows: list[int],
    layers: tuple[int, ...],
    errors: Tensor,
    *,
    angle: float | None,
    one_sided: bool,
    token_ki: float,
) -> Operator:
    """The operator of a method, with its per-layer data from ``means``."""
    if method in ("add", "caa", "pca"):
        return Add()
    if method in ("ablate", "ablate_add"):
        return Ablate(add=method == "ablate_add")
    if method == "transport":
        return Transport(
            layers=layers,
            scale=_transport_scale(means, rows, layers),
            source_mean=means.mu_source[rows],
        )
    if method == "rotate":
        axes = _moment(means, "axis_pooled", method)[rows]
        return Rotate(angle=angle, layers=layers, axes=axes)
    norms = errors.norm(dim=-1, keepdim=True)
    directions = errors / norms.clamp_min(torch.finfo(errors.dtype).tiny)
    setpoints = (means.mu_target[rows] * directions).sum(dim=-1)
    return Feedback(
        layers=layers, setpoints=setpoints, one_sided=one_sided, token_ki=token_ki
    )


#: The largest per-dimension ratio sigma_target / sigma_source a transport may
#: apply; larger ratios come from dimensions where the source barely varies.
MAX_TRANSPORT_SCALE = 100.0


def _transport_scale(
    means: Any, rows: list[int], layers: tuple[int, ...]
) -> Float[Tensor, "layer d_model"]:
    """sigma_target / sigma_source per dimension, refusing degenerate sources."""
    var_target = _moment(means, "var_target", "transport")[rows].double()
    var_source = _moment(means, "var_source", "transport")[rows].double()
    flat = var_source.mean(dim=-1) <= 1e-12 * var_target.mean(dim=-1)
    if means.n_source < 2 or flat.any():
        where = (
            ""
            if means.n_source < 2
            else f" at layers {[layers[i] for i in flat.nonzero()[:, 0].tolist()]}"
        )
        raise VectorError(
            f"The transport maps the spread of the source activations onto the "
            f"target's, but the source has no spread{where} "
            f"(n_source={means.n_source}). Measure the means on at least two "
            "different source texts (more is better), or use method='add'."
        )
    # a floor for single dimensions that never vary, relative to the layer
    floor = 1e-6 * var_source.mean(dim=-1, keepdim=True)
    scale = (var_target.clamp_min(0) / var_source.maximum(floor)).sqrt()
    if (scale > MAX_TRANSPORT_SCALE).any():
        warnings.warn(
            f"Transport scales above {MAX_TRANSPORT_SCALE:g} (up to "
            f"{scale.max().item():.3g}) were capped: a few dimensions barely vary "
            "in the source texts. More source texts give steadier scales.",
            stacklevel=4,
        )
        scale = scale.clamp_max(MAX_TRANSPORT_SCALE)
    return scale.float()


_COMPOSE_MODES = ("sum", "sequence")


@dataclass(frozen=True, eq=False)
class Composed(_BackEnds):
    """Several steerings applied together, with the interface of one.

    Attributes:
        members: The steerings, for example one per concept.
        mode: ``"sum"``: at each layer every member edits the same activation
            and their changes are added (for additive members this is the
            sum of their controls). ``"sequence"``: each member edits the
            output of the previous one, in the order given.

    Examples:
        >>> sentiment = Steering(errors=torch.randn(2, 8), layers=(0, 1))
        >>> refusal = Steering(errors=torch.randn(1, 8), layers=(1,))
        >>> both = compose(sentiment, refusal)
        >>> both.layers
        (0, 1)
    """

    members: tuple[Steering, ...]
    mode: Literal["sum", "sequence"] = "sum"

    def __post_init__(self) -> None:
        members = tuple(self.members)
        if not members:
            raise ValueError("Expected at least one steering to compose, got none.")
        for member in members:
            if not isinstance(member, Steering):
                raise TypeError(
                    f"Expected Steering members, got {type(member).__name__}."
                )
        if self.mode not in _COMPOSE_MODES:
            raise ValueError(
                f"Unknown composition mode {self.mode!r}; valid choices: "
                f"{', '.join(map(repr, _COMPOSE_MODES))}."
            )
        widths = {member.d_model for member in members}
        if len(widths) > 1:
            raise VectorError(
                f"The composed steerings have different widths {sorted(widths)}; "
                "they must be measured on the same model."
            )
        points = {member.hook_point for member in members}
        if len(points) > 1:
            raise HookPointError(
                f"The composed steerings act at different hook points "
                f"{sorted(points)}; compose steerings of one hook point, or "
                "apply the others as separate hooks."
            )
        object.__setattr__(self, "members", members)

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer steered by some member, in layer order."""
        return tuple(sorted({k for member in self.members for k in member.layers}))

    @property
    def hook_point(self) -> str:
        """The members' common hook point."""
        return self.members[0].hook_point

    @property
    def d_model(self) -> int:
        """The members' common width."""
        return self.members[0].d_model

    @property
    def is_identity(self) -> bool:
        """Whether no member changes any activation."""
        return all(member.is_identity for member in self.members)

    @property
    def needs_positions(self) -> bool:
        """Whether some member needs token positions."""
        return any(member.needs_positions for member in self.members)

    def check_model(self, model: Any) -> None:
        """Raise a clear error unless every member fits ``model``."""
        for member in self.members:
            member.check_model(model)

    def edit(
        self,
        layer: int,
        activation: Float[Tensor, "batch pos d_model"],
        where: Where | None,
        state: dict[Any, Any],
    ) -> Float[Tensor, "batch pos d_model"]:
        """The activation of ``layer`` edited by every member that steers it."""
        steered = activation
        for index, member in enumerate(self.members):
            if layer not in member.layers or member.is_identity:
                continue
            own = state.setdefault(index, {})
            if "memory" in state:
                own["memory"] = state["memory"].setdefault(index, {})
            if self.mode == "sequence":
                steered = member.edit(layer, steered, where, own)
            else:
                change = member.edit(layer, activation, where, own) - activation
                steered = steered + change
        return steered


def compose(*steerings: Steering, mode: Literal["sum", "sequence"] = "sum") -> Composed:
    """Steer several concepts at once (see :class:`Composed`).

    Examples:
        >>> a = Steering(errors=torch.ones(1, 4), layers=(0,))
        >>> b = Steering(errors=2 * torch.ones(1, 4), layers=(0,))
        >>> compose(a, b).edit(0, torch.zeros(1, 1, 4), None, {})[0, 0]
        tensor([3., 3., 3., 3.])
    """
    return Composed(members=steerings, mode=mode)
