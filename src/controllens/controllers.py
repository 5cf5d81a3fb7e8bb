"""P, PI, PD and PID controllers over the layers of a transformer.

The forward pass is read as a discrete-time system whose time step is the layer
(Nguyen et al., "Activation Steering with a Feedback Controller", arXiv
2510.04309). With r(k) the error signal at the k-th steered layer, the control
signal is

    u(k) = Kp r(k) + Ki sum_{j<k} r(j) + Kd (r(k) - r(k-1))

where the sum and the difference run over the steered layers in layer order.
The derivative of the first steered layer is zero (there is no earlier
measurement to difference against), so the D term over a run of layers
telescopes to Kd (r(K) - r(k0)).
"""

import math
import numbers
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Gains", "LayerController", "control_signal"]


@dataclass(frozen=True, kw_only=True)
class Gains:
    """Controller gains; each must be finite and non-negative.

    Attributes:
        kp: Proportional gain. ``Gains(kp=1)`` is ActAdd / mean-difference
            steering.
        ki: Integral gain, on the sum of the errors of earlier steered layers.
        kd: Derivative gain, on the change of the error since the previous
            steered layer.
        integral_bound: Anti-windup: the largest norm the integral term
            ``ki * sum r(j)`` may reach. The accumulator itself is clipped, so
            it stops growing instead of having to unwind later. None: no bound.

    Examples:
        >>> Gains.pid(kp=0.9, ki=0.01, kd=0.01).name
        'PID'
        >>> Gains.p(2.0)
        Gains(kp=2.0, ki=0.0, kd=0.0, integral_bound=None)
    """

    kp: float = 1.0
    ki: float = 0.0
    kd: float = 0.0
    integral_bound: float | None = None

    def __post_init__(self) -> None:
        for field in ("kp", "ki", "kd"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Gain {field} must be a number, got {value!r}.")
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"Gain {field} must be finite and >= 0, got {value}. Steer "
                    "the other way by swapping target and source, or use a "
                    "negative alpha."
                )
            object.__setattr__(self, field, float(value))
        bound = self.integral_bound
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, numbers.Real)
        ):
            raise TypeError(f"integral_bound must be a number or None, got {bound!r}.")
        if bound is not None and (not math.isfinite(bound) or bound <= 0):
            raise ValueError(
                f"integral_bound must be a positive finite norm or None, got {bound}."
            )
        if bound is not None:
            object.__setattr__(self, "integral_bound", float(bound))

    @classmethod
    def p(cls, kp: float = 1.0) -> "Gains":
        """A proportional controller."""
        return cls(kp=kp)

    @classmethod
    def pi(cls, kp: float = 1.0, ki: float = 0.1, **kwargs: float) -> "Gains":
        """A proportional-integral controller."""
        return cls(kp=kp, ki=ki, **kwargs)

    @classmethod
    def pd(cls, kp: float = 1.0, kd: float = 0.1, **kwargs: float) -> "Gains":
        """A proportional-derivative controller."""
        return cls(kp=kp, kd=kd, **kwargs)

    @classmethod
    def pid(
        cls, kp: float = 1.0, ki: float = 0.1, kd: float = 0.1, **kwargs: float
    ) -> "Gains":
        """A proportional-integral-derivative controller."""
        return cls(kp=kp, ki=ki, kd=kd, **kwargs)

    @property
    def name(self) -> str:
        """``"P"``, ``"PI"``, ``"PD"`` or ``"PID"`` from the non-zero gains."""
        return "P" + ("I" if self.ki else "") + ("D" if self.kd else "")

    @property
    def is_zero(self) -> bool:
        """Whether every gain is zero, so the controller never acts."""
        return self.kp == 0 and self.ki == 0 and self.kd == 0


class LayerController:
    """The PID recursion, one steered layer at a time.

    Feed the error of each steered layer in layer order with :meth:`step`. The
    error may carry leading batch axes (one error per token, for closed-loop
    control); the state keeps them.

    Examples:
        >>> controller = LayerController(Gains.pid(kp=1.0, ki=0.5, kd=0.25))
        >>> [controller.step(torch.tensor([r])).item() for r in (2.0, 4.0, 4.0)]
        [2.0, 5.5, 7.0]
    """

    def __init__(self, gains: Gains) -> None:
        self.gains = gains
        self._integral: Tensor | None = None
        self._previous: Tensor | None = None

    def step(
        self, error: Float[Tensor, "*batch d_model"]
    ) -> Float[Tensor, "*batch d_model"]:
        """Control signal u(k) for the next steered layer's error r(k)."""
        gains = self.gains
        signal = gains.kp * error
        if self._integral is not None:
            signal = signal + gains.ki * self._integral
        if self._previous is not None:
            signal = signal + gains.kd * (error - self._previous)

        # the integral for the next layer holds this layer's error too
        integral = error if self._integral is None else self._integral + error
        if gains.integral_bound is not None and gains.ki > 0:
            limit = gains.integral_bound / gains.ki
            norm = integral.norm(dim=-1, keepdim=True)
            integral = integral * (limit / norm.clamp_min(limit)).clamp_max(1.0)
        self._integral = integral
        self._previous = error
        return signal


def control_signal(
    errors: Float[Tensor, "layer d_model"], gains: Gains
) -> Float[Tensor, "layer d_model"]:
    """Open-loop control signals u(k) for a sequence of per-layer errors r(k).

    Args:
        errors: r(k) for each steered layer, in layer order.
        gains: The controller gains.

    Returns:
        u(k) for each steered layer. With ``Gains.p(1.0)`` this equals
        ``errors``.

    Examples:
        >>> r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        >>> control_signal(r, Gains.pi(kp=1.0, ki=1.0))
        tensor([[1., 0.],
                [2., 1.],
                [2., 2.]])
    """
    if errors.ndim != 2:
        raise ValueError(
            f"Expected errors of shape [layer, d_model], got {tuple(errors.shape)}."
        )
    controller = LayerController(gains)
    return torch.stack([controller.step(error) for error in errors])
