import pytest
import torch

from controllens.controllers import Gains, LayerController, control_signal


def _by_hand(errors, kp, ki, kd):
    """The recursion of DESIGN.md written out with Python lists."""
    out, total, previous = [], torch.zeros_like(errors[0]), None
    for r in errors:
        d = torch.zeros_like(r) if previous is None else r - previous
        out.append(kp * r + ki * total + kd * d)
        total, previous = total + r, r
    return torch.stack(out)


@pytest.mark.parametrize(
    "gains",
    [Gains.p(0.7), Gains.pi(1.0, 0.3), Gains.pd(1.0, 0.5), Gains.pid(0.9, 0.2, 0.4)],
    ids=["P", "PI", "PD", "PID"],
)
def test_control_signal_matches_the_recursion_computed_by_hand(gains):
    errors = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    expected = _by_hand(errors, gains.kp, gains.ki, gains.kd)
    torch.testing.assert_close(control_signal(errors, gains), expected)


def test_p_controller_with_unit_gain_returns_the_errors_exactly():
    errors = torch.randn(4, 5)
    assert torch.equal(control_signal(errors, Gains.p(1.0)), errors)


def test_integral_of_a_constant_error_grows_linearly_across_layers():
    errors = torch.ones(4, 1)
    u = control_signal(errors, Gains(kp=0.0, ki=1.0))
    assert u.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_derivative_of_the_first_layer_is_zero_and_telescopes():
    errors = torch.tensor([[1.0], [3.0], [6.0]])
    u = control_signal(errors, Gains(kp=0.0, kd=1.0))
    assert u.flatten().tolist() == [0.0, 2.0, 3.0]
    assert u.sum().item() == errors[-1].item() - errors[0].item()


def test_anti_windup_bounds_the_norm_of_the_integral_term():
    errors = torch.full((10, 3), 2.0)
    gains = Gains(kp=0.0, ki=0.5, integral_bound=1.5)
    u = control_signal(errors, gains)
    assert u.norm(dim=-1).max() <= 1.5 + 1e-6
    unbounded = control_signal(errors, Gains(kp=0.0, ki=0.5))
    assert unbounded.norm(dim=-1).max() > 1.5


def test_layer_controller_keeps_batch_axes_for_per_token_errors():
    controller = LayerController(Gains.pid(1.0, 0.5, 0.5))
    first = controller.step(torch.randn(2, 7, 4))
    second = controller.step(torch.randn(2, 7, 4))
    assert first.shape == second.shape == (2, 7, 4)


def test_gain_names_follow_the_non_zero_gains():
    names = [g.name for g in (Gains.p(), Gains.pi(), Gains.pd(), Gains.pid())]
    assert names == ["P", "PI", "PD", "PID"]
    assert Gains(kp=0.0).is_zero


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kp": -1.0}, "kp must be finite and >= 0"),
        ({"ki": float("nan")}, "ki must be finite"),
        ({"kd": float("inf")}, "kd must be finite"),
        ({"integral_bound": 0.0}, "integral_bound must be a positive"),
    ],
    ids=["negative", "nan", "inf", "zero-bound"],
)
def test_invalid_gains_are_refused_with_the_value_received(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Gains(**kwargs)


def test_a_gain_that_is_not_a_number_is_a_type_error():
    # the test run's beartype check may answer first; both are TypeErrors
    with pytest.raises(TypeError):
        Gains(kp="1")


def test_control_signal_refuses_errors_that_are_not_two_dimensional():
    # ValueError from controllens, or the shape checker's TypeError in tests
    with pytest.raises((ValueError, TypeError), match=r"layer|shape"):
        control_signal(torch.randn(3), Gains())
