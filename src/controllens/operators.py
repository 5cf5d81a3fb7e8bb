"""How the control signal enters the activation: one operator per steering method.

Every mainstream steering method edits the residual stream with a signal
measured from contrastive data; they differ in *how* that signal enters the
activation. Here the signal is the controller output u(k) (P, PI, PD or PID
over the errors r(k)) and the method is an :class:`Operator`:

=====================  ==============================================  =========
operator               edit of an activation x at layer k               strength
=====================  ==============================================  =========
:class:`Add`           ``x + alpha u(k)`` (ActAdd, CAA, mean diff.)     alpha
:class:`Ablate`        ``x - alpha (d.x) d``, d = u(k) / ||u(k)||       alpha
:class:`Ablate` (add)  ``x - alpha (d.x) d + alpha u(k)``               alpha
:class:`Transport`     ``x + alpha (u(k) + Kp (a - 1) * (x - mu_s))``   alpha
:class:`Rotate`        rotate x in the plane (b, d) by alpha * angle    alpha
:class:`Feedback`      per-token closed loop along d, see its docs      alpha
=====================  ==============================================  =========

Every operator but :class:`Add` leaves the first real token of each text, an
attention sink with a huge norm, untouched (the back ends locate it).
With P control and Kp = 1 each row is the published method (ActAdd / CAA,
directional ablation, Linear-AcT / Mean-AcT, angular steering); the I and D
terms change u(k), and with it the direction d and the shift of the transport.

A new method is one new subclass: implement :meth:`Operator.edit` (and
:meth:`Operator.check` when it carries per-layer data).
"""

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from controllens.controllers import LayerController
from controllens.errors import VectorError

if TYPE_CHECKING:
    from controllens.steering import Steering

__all__ = [
    "OPERATORS",
    "Ablate",
    "Add",
    "Feedback",
    "Operator",
    "Rotate",
    "Transport",
    "operator_by_name",
]

_PARALLEL_TOLERANCE = 1e-3


def _unit(vector: Tensor) -> Tensor | None:
    """``vector`` scaled to unit norm (in float32 or wider); None when it is 0."""
    vector = vector.to(torch.promote_types(vector.dtype, torch.float32))
    norm = vector.norm()
    if norm == 0:
        return None
    return vector / norm


def _like(tensor: Tensor, activation: Tensor) -> Tensor:
    return tensor.to(dtype=activation.dtype, device=activation.device)


def _layer_rows(
    name: str, layers: Iterable[int], values: Tensor, d_model: int | None = None
) -> tuple[tuple[int, ...], Tensor]:
    """Check per-layer operator data: one finite row per layer."""
    if not isinstance(values, Tensor):
        raise VectorError(
            f"Expected {name} as a tensor [layer, d_model], got "
            f"{type(values).__name__}. Pass torch.tensor(...)."
        )
    if isinstance(layers, numbers.Integral):
        layers = (layers,)
    layers = tuple(int(layer) for layer in layers)
    if values.ndim != 2 or values.shape[0] != len(layers):
        raise VectorError(
            f"Expected {name} of shape [layer, d_model] with one row per layer "
            f"{layers}, got {tuple(values.shape)}."
        )
    if d_model is not None and values.shape[1] != d_model:
        raise VectorError(
            f"Expected {name} of width {d_model}, got {values.shape[1]}: it was "
            "measured on another model. Measure it on the model you steer."
        )
    if not values.is_floating_point():
        raise VectorError(
            f"Expected floating-point {name}, got {values.dtype}. Convert it "
            "with .float()."
        )
    if not values.isfinite().all():
        raise VectorError(
            f"Expected finite {name}, got NaN or infinite entries. Re-measure it."
        )
    return layers, values.detach().clone()


def _check_covers(
    name: str, layers: tuple[int, ...], rows: Tensor | None, steering: "Steering"
) -> None:
    """Operator data must cover every steered layer, at the model's width."""
    missing = [k for k in steering.layers if k not in layers]
    if missing:
        raise VectorError(
            f"The operator has no {name} for layers {missing}; they cover "
            f"{layers}. Measure the means (moments=True) at those layers."
        )
    if rows is not None and rows.shape[1] != steering.d_model:
        raise VectorError(
            f"Expected {name} of width {steering.d_model}, got {rows.shape[1]}: "
            "they were measured on another model. Measure the means "
            "(moments=True) on the model you steer."
        )


@dataclass(frozen=True, kw_only=True)
class Operator(ABC):
    """How one steering method applies the control signal to an activation.

    Subclasses implement :meth:`edit`. The back ends call it at every steered
    layer of every forward pass, with the activation of that layer and the
    :class:`~controllens.steering.Steering` that holds the errors, gains and
    strength; token positions are handled outside (an operator edits every
    token it is given). What an operator derives from ``control`` and its own
    data may be kept with :meth:`~controllens.steering.Steering.cached`, per
    steering and layer: ``control`` is always that steering's u(k) there.

    Examples:
        >>> @dataclass(frozen=True, kw_only=True)
        ... class Scale(Operator):
        ...     name: ClassVar[str] = "scale"
        ...     def edit(self, activation, *, layer, control, steering, state):
        ...         return activation * (1 + steering.alpha)
        >>> Scale().name
        'scale'
    """

    #: The method name used by ``Steering.from_means(method=...)``.
    name: ClassVar[str]
    #: Whether :meth:`edit` needs each token's position (the back ends then
    #: track positions even when the steering acts on every token).
    needs_positions: ClassVar[bool] = False
    #: Whether the first real token of each text may be edited. It is an
    #: attention sink whose norm is about 100 times the others' (SmolLM2:
    #: 20,000 against 180-850), so operators whose edit scales with the
    #: activation (ablation, transport, rotation, feedback) leave it alone;
    #: addition moves it by the same small vector as every token.
    edits_first_token: ClassVar[bool] = True

    @abstractmethod
    def edit(
        self,
        activation: Float[Tensor, "*batch d_model"],
        *,
        layer: int,
        control: Float[Tensor, " d_model"],
        steering: "Steering",
        state: dict[Any, Any],
    ) -> Float[Tensor, "*batch d_model"]:
        """The steered activation at ``layer``.

        Args:
            activation: The activation at the steered hook point.
            layer: The model layer.
            control: The open-loop control signal u(k) of this layer (without
                alpha), from the steering's errors and gains.
            steering: The steering being applied (its gains, alpha, errors).
            state: A dictionary shared by the layers of one forward pass and
                emptied before the next pass, for operators with memory.
        """

    def check(self, steering: "Steering") -> None:  # noqa: B027 (optional)
        """Raise a clear error unless this operator fits ``steering``.

        Operators without per-layer data have nothing to check.
        """

    def is_identity(self, steering: "Steering") -> bool:
        """Whether the operator leaves every activation unchanged."""
        return (
            steering.alpha == 0 or steering.gains.is_zero or not steering.errors.any()
        )


@dataclass(frozen=True, kw_only=True)
class Add(Operator):
    """Activation addition, ``x <- x + alpha u(k)``: ActAdd, CAA, mean difference.

    With ``Gains.p(1.0)`` this is mean-difference steering; measured on the
    answer letter of A/B data (``aggregation="last"``) it is CAA.

    Examples:
        >>> from controllens.steering import Steering
        >>> steering = Steering(errors=torch.ones(1, 3), layers=(0,), alpha=2.0)
        >>> Add().edit(torch.zeros(1, 3), layer=0, control=torch.ones(3),
        ...            steering=steering, state={})
        tensor([[2., 2., 2.]])
    """

    name: ClassVar[str] = "add"

    def edit(
        self,
        activation: Float[Tensor, "*batch d_model"],
        *,
        layer: int,
        control: Float[Tensor, " d_model"],
        steering: "Steering",
        state: dict[Any, Any],
    ) -> Float[Tensor, "*batch d_model"]:
        edit = steering.cached(
            ("add", layer, activation.dtype, activation.device),
            lambda: _like(steering.alpha * control, activation),
        )
        return activation + edit


@dataclass(frozen=True, kw_only=True)
class Ablate(Operator):
    """Directional ablation along the control signal's direction.

    ``x <- x - alpha (d.x) d`` with ``d = u(k) / ||u(k)||``: alpha = 1 removes
    the component along d entirely. With ``add=True`` the ablated activation
    then receives ``alpha u(k)``, so every token ends with the same component
    along d (the "ablate then add" variant). Only the direction of u(k)
    matters for the ablation itself: the I and D terms act by turning it.

    Attributes:
        add: Add ``alpha u(k)`` after ablating.

    Examples:
        >>> from controllens.steering import Steering
        >>> steering = Steering(errors=torch.tensor([[1.0, 0.0]]), layers=(0,),
        ...                     operator=Ablate())
        >>> steering.operator.edit(torch.tensor([[3.0, 4.0]]), layer=0,
        ...                        control=torch.tensor([2.0, 0.0]),
        ...                        steering=steering, state={})
        tensor([[0., 4.]])
    """

    name: ClassVar[str] = "ablate"
    needs_positions: ClassVar[bool] = True
    edits_first_token: ClassVar[bool] = False
    add: bool = False

    def edit(
        self,
        activation: Float[Tensor, "*batch d_model"],
        *,
        layer: int,
        control: Float[Tensor, " d_model"],
        steering: "Steering",
        state: dict[Any, Any],
    ) -> Float[Tensor, "*batch d_model"]:
        key = ("ablate", layer, activation.dtype, activation.device)
        d, add = steering.cached(key, lambda: self._derive(control, activation))
        if d is None:
            return activation
        projection = (activation * d).sum(dim=-1, keepdim=True)
        steered = activation - steering.alpha * projection * d
        if add is not None:
            steered = steered + steering.alpha * add
        return steered

    def _derive(
        self, control: Tensor, activation: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        direction = _unit(control)
        if direction is None:
            return None, None
        add = _like(control, activation) if self.add else None
        return _like(direction, activation), add


@dataclass(frozen=True, kw_only=True, eq=False)
class Transport(Operator):
    """Mean activation transport (Linear-AcT / Mean-AcT) driven by u(k).

    Per dimension, source activations are mapped onto the target distribution
    by ``T(x) = a (x - mu_s) + mu_s + r(k)`` with ``a = sigma_t / sigma_s``:
    its mean shift is r(k), its per-token part rescales each dimension around
    the source mean. The operator replaces the shift by the controller output:

        x <- x + alpha (u(k) + Kp (a - 1) * (x - mu_s))

    With ``Gains.p(1.0)`` and alpha = 1 this is the transport map itself;
    alpha in (0, 1) interpolates towards it. Build it from means measured with
    ``moments=True`` through ``Steering.from_means(means, method="transport")``.

    Attributes:
        layers: The layers of the rows of ``scale`` and ``source_mean``.
        scale: Per-dimension ratio ``a = sigma_target / sigma_source``.
        source_mean: Per-dimension source mean ``mu_s``.

    Examples:
        >>> from controllens.steering import Steering
        >>> op = Transport(layers=(0,), scale=torch.tensor([[2.0, 1.0]]),
        ...                source_mean=torch.zeros(1, 2))
        >>> steering = Steering(errors=torch.tensor([[1.0, 1.0]]), layers=(0,),
        ...                     operator=op)
        >>> op.edit(torch.tensor([[3.0, 3.0]]), layer=0, control=torch.ones(2),
        ...         steering=steering, state={})
        tensor([[7., 4.]])
    """

    name: ClassVar[str] = "transport"
    needs_positions: ClassVar[bool] = True
    edits_first_token: ClassVar[bool] = False
    layers: tuple[int, ...]
    scale: Float[Tensor, "layer d_model"] = field(repr=False)
    source_mean: Float[Tensor, "layer d_model"] = field(repr=False)

    def __post_init__(self) -> None:
        layers, scale = _layer_rows("scale", self.layers, self.scale)
        _, source_mean = _layer_rows(
            "source_mean", layers, self.source_mean, scale.shape[1]
        )
        if (scale < 0).any():
            raise VectorError(
                "Expected non-negative transport scales (ratios of standard "
                "deviations), got negative entries."
            )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "source_mean", source_mean)

    def is_identity(self, steering: "Steering") -> bool:
        # the per-token part acts even where r(k) is zero
        return steering.alpha == 0 or steering.gains.is_zero

    def check(self, steering: "Steering") -> None:
        _check_covers("transport scales", self.layers, self.scale, steering)

    def edit(
        self,
        activation: Float[Tensor, "*batch d_model"],
        *,
        layer: int,
        control: Float[Tensor, " d_model"],
        steering: "Steering",
        state: dict[Any, Any],
    ) -> Float[Tensor, "*batch d_model"]:
        key = ("transport", layer, activation.dtype, activation.device)
        factor, shift = steering.cached(
            key, lambda: self._derive(layer, control, steering, activation)
        )
        return activation + factor * activation + shift

    def _derive(
        self, layer: int, control: Tensor, steering: "Steering", activation: Tensor
    ) -> tuple[Tensor, Tensor]:
        row = self.layers.index(layer)
        factor = steering.alpha * steering.gains.kp * (self.scale[row] - 1)
        factor = factor.to(control.device)
        shift = steering.alpha * control - factor * self.source_mean[row].to(factor)
        return _like(factor, activation), _like(shift, activation)


def _check_angle(degrees: Any) -> float:
    if (
        isinstance(degrees, bool)
        or not isinstance(degrees, numbers.Real)
        or not math.isfinite(degrees)
        or not -180 <= degrees <= 180
    ):
        raise ValueError(
            f"Expected a rotation angle in degrees within [-180, 180], got "
            f"{degrees!r}. Positive angles turn activations towards the "
            "steering direction."
        )
    return float(degrees)


@dataclass(frozen=True, kw_only=True, eq=False)
class Rotate(Operator):
    """Angular steering: rotate each activation in the plane of (b, d).

    d is the unit control direction u(k) / ||u(k)||, b the second axis made
    orthogonal to d. The component of each token inside the plane is turned
    towards d by ``alpha * angle`` degrees (away from d for a negative angle),
    stopping at d (or at -d); the component outside the plane is untouched,
    so the norm of x is preserved exactly (up to float rounding). Turning
    towards d, rather than in one fixed sense from b, makes the edit
    independent of the sign of b: every token moves towards the concept.

    Attributes:
        angle: Rotation angle in degrees, within [-180, 180]; the steering's
            alpha scales it.
        layers: The layers of the rows of ``axes``.
        axes: The second axis of each layer: by default the first principal
            component of the contrastive activations (``means.axis_pooled``).

    Examples:
        >>> from controllens.steering import Steering
        >>> op = Rotate(angle=90.0, layers=(0,), axes=torch.tensor([[0.0, 1.0]]))
        >>> steering = Steering(errors=torch.tensor([[1.0, 0.0]]), layers=(0,),
        ...                     operator=op)
        >>> x = torch.tensor([[0.0, 2.0], [0.0, -2.0]])  # 90 degrees off d
        >>> op.edit(x, layer=0, control=torch.tensor([1.0, 0.0]),
        ...         steering=steering, state={}).round(decimals=5)
        tensor([[2., 0.],
                [2., 0.]])
    """

    name: ClassVar[str] = "rotate"
    needs_positions: ClassVar[bool] = True
    edits_first_token: ClassVar[bool] = False
    angle: float
    layers: tuple[int, ...]
    axes: Float[Tensor, "layer d_model"] = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "angle", _check_angle(self.angle))
        layers, axes = _layer_rows("axes", self.layers, self.axes)
        if (axes.norm(dim=-1) == 0).any():
            raise VectorError("Expected non-zero second axes, got a zero row.")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "axes", axes)

    def _plane(self, layer: int, control: Tensor) -> tuple[Tensor, Tensor] | None:
        direction = _unit(control)
        if direction is None:
            return None
        axis = self.axes[self.layers.index(layer)].to(direction)
        axis = axis - (axis @ direction) * direction
        norm = axis.norm()
        if norm < _PARALLEL_TOLERANCE * self.axes[self.layers.index(layer)].norm():
            raise VectorError(
                f"The second axis of layer {layer} is parallel to the steering "
                "direction, so they span no plane. Choose another axis (for "
                "example the pooled principal component, means.axis_pooled)."
            )
        return direction, axis / norm

    def check(self, steering: "Steering") -> None:
        _check_covers("second axes", self.layers, self.axes, steering)
        for layer, control in zip(steering.layers, steering.control(), strict=True):
            self._plane(layer, control)

    def is_identity(self, steering: "Steering") -> bool:
        return self.angle == 0 or super().is_identity(steering)

    def edit(
        self,
        activation: Float[Tensor, "*batch d_model"],
        *,
        layer: int,
        control: Float[Tensor, " d_model"],
        steering: "Steering",
        state: dict[Any, Any],
    ) -> Float[Tensor, "*batch d_model"]:
        key = ("rotate", layer, activation.dtype, activation.device)
        plane = steering.cached(
            key,
            lambda: (
                tuple(_like(v, activation) for v in self._plane(layer, control))
                if control.any()
                else ()
            ),
        )
        if not plane:
            return activation
        d, b = plane
        theta = math.radians(steering.alpha * self.angle)
        along_d = (activation * d).sum(dim=-1, keepdim=True)
        along_b = (activation * b).sum(dim=-1, keepdim=True)
        # each token's angle from d inside the plane, turned towards d (or
        # away for a negative angle), never past d or its opposite
        phi = torch.atan2(along_b, along_d)
        turned = phi.sign() * (phi.abs() - theta).clamp(0, math.pi)
        radius = torch.hypot(along_d, along_b)
        new_d, new_b = radius * turned.cos(), radius * turned.sin()
        return activation + (new_d - along_d) * d + (new_b - along_b) * b


@dataclass(frozen=True, kw_only=True, eq=False)
class Feedback(Operator):
    """Closed-loop control: each token's own error, measured during the pass.

    The open-loop methods push every token by the same u(k), fixed once the
    means are known. Here the error of a token at layer k is the gap between
    a set-point and the token's own projection on the concept direction d_k
    (the unit r(k)):

        e(k) = s(k) - d_k . x

    and the P, I and D terms act on each token's e(k) across the steered
    layers of the forward pass (the integral and the previous error are kept
    per token, and reset for every forward pass):

        x <- x + alpha u_token(k) d_k

    Tokens at the set-point get no push; tokens far from it get more. With
    ``one_sided=True`` tokens beyond the set-point are left alone (e clipped
    at 0) instead of being pushed back. The first real token of each text (an
    attention sink with a huge norm) is never steered.

    With ``token_ki > 0`` the loop also runs across the tokens of a sequence:
    each token's push at layer k gains ``token_ki`` times the sum of the errors
    of the earlier tokens of its sequence at that layer (an integral over
    time, carried through the KV cache during generation). Padding is assumed
    on the left, as generation requires.

    Attributes:
        layers: The layers of the rows of ``setpoints``.
        setpoints: The target projection s(k) of each layer; by default the
            target mean's projection, ``d_k . mu_target(k)``.
        one_sided: Only push tokens that fall short of the set-point.
        token_ki: Integral gain across earlier tokens of the sequence.

    Examples:
        >>> from controllens.steering import Steering
        >>> op = Feedback(layers=(0,), setpoints=torch.tensor([2.0]))
        >>> steering = Steering(errors=torch.tensor([[1.0, 0.0]]), layers=(0,),
        ...                     operator=op)
        >>> x = torch.tensor([[[9.0, 9.0], [0.5, 1.0], [3.0, 1.0]]])  # sink first
        >>> op.edit(x, layer=0, control=torch.ones(2), steering=steering,
        ...         state={"first": torch.tensor([[True, False, False]])})
        tensor([[[9., 9.],
                 [2., 1.],
                 [3., 1.]]])
    """

    name: ClassVar[str] = "feedback"
    needs_positions: ClassVar[bool] = True
    edits_first_token: ClassVar[bool] = False
    layers: tuple[int, ...]
    setpoints: Float[Tensor, " layer"] = field(repr=False)
    one_sided: bool = True
    token_ki: float = 0.0

    def __post_init__(self) -> None:
        token_ki = self.token_ki
        if (
            isinstance(token_ki, bool)
            or not isinstance(token_ki, numbers.Real)
            or not math.isfinite(token_ki)
            or token_ki < 0
        ):
            raise ValueError(
                f"Expected token_ki a finite number >= 0, got {token_ki!r}."
            )
        object.__setattr__(self, "token_ki", float(token_ki))
        given = self.layers
        layers = (given,) if isinstance(given, numbers.Integral) else given
        layers = tuple(int(layer) for layer in layers)
        setpoints = self.setpoints
        if not isinstance(setpoints, Tensor):
            raise VectorError(
                f"Expected setpoints as a tensor [layer], got "
                f"{type(setpoints).__name__}. Pass torch.tensor(...)."
            )
        if setpoints.ndim != 1 or setpoints.shape[0] != len(layers):
            raise VectorError(
                f"Expected one set-point per layer {layers}, got shape "
                f"{tuple(setpoints.shape)}."
            )
        if not setpoints.isfinite().all():
            raise VectorError(
                "Expected finite set-points, got NaN or infinity. Re-measure the "
                "means the set-points come from (target projections on r(k))."
            )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "setpoints", setpoints.detach().clone())

    def check(self, steering: "Steering") -> None:
        _check_covers("set-points", self.layers, None, steering)

    def edit(
        self,
        activation: Float[Tensor, "*batch d_model"],
        *,
        layer: int,
        control: Float[Tensor, " d_model"],
        steering: "Steering",
        state: dict[Any, Any],
    ) -> Float[Tensor, "*batch d_model"]:
        key = ("feedback", layer, activation.device)
        d, setpoint = steering.cached(
            key, lambda: self._derive(layer, steering, activation.device)
        )
        if d is None:
            return activation
        # the loop runs in float32 whatever the model's dtype
        error = setpoint - activation.to(d.dtype) @ d
        if self.one_sided:
            error = error.clamp_min(0)
        for ignored in ("first", "pad"):
            if state.get(ignored) is not None:
                error = error.masked_fill(state[ignored].to(error.device), 0)
        controller = state.get("controller")
        if controller is None:
            controller = state["controller"] = LayerController(steering.gains)
        push = controller.step(error.unsqueeze(-1))
        if self.token_ki:
            push = push + self.token_ki * self._earlier_errors(layer, error, state)
        return activation + _like(steering.alpha * push * d, activation)

    def _derive(
        self, layer: int, steering: "Steering", device: torch.device
    ) -> tuple[Tensor | None, float]:
        direction = _unit(steering.errors[steering.layers.index(layer)])
        setpoint = self.setpoints[self.layers.index(layer)].item()
        return (None if direction is None else direction.to(device)), setpoint

    def is_identity(self, steering: "Steering") -> bool:
        # the integral across tokens acts even when the layer gains are zero
        gains_idle = steering.gains.is_zero and self.token_ki == 0
        return steering.alpha == 0 or gains_idle or not steering.errors.any()

    def _earlier_errors(
        self, layer: int, error: Float[Tensor, "*batch pos"], state: dict[Any, Any]
    ) -> Float[Tensor, "*batch pos 1"]:
        """Sum of the errors of each token's earlier tokens at ``layer``,
        including those of earlier forward passes of the same sequences."""
        memory = state.setdefault("memory", {})
        carried = memory.get(layer)
        if carried is None or carried.shape != error.shape[:-1]:
            carried = error.new_zeros(error.shape[:-1])
        earlier = error.cumsum(dim=-1) - error + carried[..., None]
        memory[layer] = carried + error.sum(dim=-1)
        return earlier.unsqueeze(-1)


#: Operators by method name; ``"pca"`` is :class:`Add` on the PCA / RepE
#: signal (see :meth:`controllens.steering.Steering.from_means`).
OPERATORS: dict[str, type[Operator]] = {
    op.name: op for op in (Add, Ablate, Transport, Rotate, Feedback)
}


def operator_by_name(name: str) -> type[Operator]:
    """The operator class of a method name, with a clear error for unknown ones.

    Examples:
        >>> operator_by_name("rotate").__name__
        'Rotate'
    """
    try:
        return OPERATORS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown steering method {name!r}; valid choices: "
            f"{', '.join(sorted(OPERATORS))}."
        ) from None
