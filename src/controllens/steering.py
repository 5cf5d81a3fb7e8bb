"""One steering specification, shared by the TransformerLens and nnsight back ends.

A :class:`Steering` holds the error signal r(k) of each steered layer, the
controller gains, the strength alpha and the token positions to act on. Its
control signal ``alpha * u(k)`` is what both back ends add to the residual
stream, so the same object steers a TransformerBridge (:meth:`Steering.hooks`,
:meth:`Steering.apply`) and an nnsight model (:meth:`Steering.intervene`) the
same way.
"""

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

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
from controllens.errors import LayerError, MetadataMismatchError, VectorError

__all__ = ["Positions", "Steering"]

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


@dataclass(frozen=True, kw_only=True, eq=False)
class Steering:
    """What to add, where, and with which controller.

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

    @classmethod
    def from_means(
        cls,
        means: Any,
        *,
        layers: int | Iterable[int] | None = None,
        **kwargs: Any,
    ) -> "Steering":
        """Steer with r(k) = mu_target(k) - mu_source(k) from contrastive means.

        Args:
            means: A :class:`~controllens.vectors.ContrastiveMeans`.
            layers: The layers to steer (a subset of ``means.layers``; negative
                indices count from the end); None for all of them.
            **kwargs: Other :class:`Steering` fields (gains, alpha, positions).
        """
        available = tuple(means.layers)
        chosen = available if layers is None else resolve_layers(layers, means.n_layers)
        missing = [k for k in chosen if k not in available]
        if missing:
            raise LayerError(
                f"Layers {missing} have no measured error; the means cover "
                f"layers {available}. Re-estimate with those layers."
            )
        rows = [available.index(k) for k in chosen]
        return cls(
            errors=means.r[rows],
            layers=chosen,
            hook_point=means.hook_point,
            model_name=means.model_name,
            n_layers=means.n_layers,
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
        return self.alpha == 0 or self.gains.is_zero or not self.errors.any()

    def control(self) -> Float[Tensor, "layer d_model"]:
        """The edit ``alpha * u(k)`` added at each steered layer, in layer order."""
        return self.alpha * control_signal(self.errors, self.gains)

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

    # the back ends live in their own modules; these are thin entry points

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
        with model.hooks(fwd_hooks=self.hooks(model, attention_mask=attention_mask)):
            yield model

    def intervene(self, model: Any, tracer: Any | None = None) -> None:
        """Apply this steering inside an nnsight ``trace`` or ``generate`` block.

        See :func:`controllens.interventions.steer`.
        """
        from controllens.interventions import steer

        steer(self, model, tracer)


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


def add_masked(
    activation: Float[Tensor, "batch pos d_model"],
    edit: Float[Tensor, " d_model"],
    mask: Bool[Tensor, "batch pos 1"] | None,
) -> Float[Tensor, "batch pos d_model"]:
    """``activation + edit`` where ``mask`` holds (everywhere when None)."""
    if mask is None:
        return activation + edit
    return torch.where(mask, activation + edit, activation)
