import pytest
import torch

from controllens.controllers import Gains
from controllens.errors import LayerError, VectorError
from controllens.steering import Steering, position_mask


def test_layers_are_put_in_layer_order_with_their_rows():
    errors = torch.stack([torch.full((4,), float(k)) for k in (5, 1, 3)])
    steering = Steering(errors=errors, layers=(5, 1, 3))
    assert steering.layers == (1, 3, 5)
    assert steering.errors[:, 0].tolist() == [1.0, 3.0, 5.0]


def test_negative_layers_count_from_the_end_when_the_model_size_is_known():
    steering = Steering(errors=torch.randn(2, 4), layers=(-1, 0), n_layers=6)
    assert steering.layers == (0, 5)


def test_the_stored_errors_are_a_private_copy():
    errors = torch.randn(2, 4)
    steering = Steering(errors=errors, layers=(0, 1))
    before = steering.errors.clone()
    errors.add_(100.0)
    steering.control()
    assert torch.equal(steering.errors, before)


def test_control_is_alpha_times_the_pid_signal():
    errors = torch.randn(3, 4)
    steering = Steering(errors=errors, layers=(0, 1, 2), gains=Gains.pi(), alpha=2.0)
    expected = 2.0 * torch.stack(
        [
            errors[0],
            errors[1] + 0.1 * errors[0],
            errors[2] + 0.1 * (errors[0] + errors[1]),
        ]
    )
    torch.testing.assert_close(steering.control(), expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"errors": torch.randn(2, 4), "layers": (0,)}, VectorError, "one row"),
        (
            {"errors": torch.full((1, 4), float("nan")), "layers": (0,)},
            VectorError,
            "NaN or infinite",
        ),
        ({"errors": torch.randn(1, 4), "layers": (-1,)}, LayerError, "n_layers"),
        (
            {"errors": torch.randn(1, 4), "layers": (9,), "n_layers": 4},
            LayerError,
            r"0\.\.3",
        ),
        ({"errors": torch.randn(2, 4), "layers": (1, 1)}, LayerError, "once"),
        (
            {"errors": torch.randn(1, 4), "layers": (0,), "positions": "middle"},
            (ValueError, TypeError),  # beartype answers first in the test run
            "middle",
        ),
        (
            {"errors": torch.randn(1, 4), "layers": (0,), "hook_point": "mlp"},
            ValueError,
            "resid_post",
        ),
        (
            {"errors": torch.randn(1, 4), "layers": (0,), "alpha": float("inf")},
            ValueError,
            "finite",
        ),
    ],
    ids=["rows", "nan", "negative", "range", "duplicate", "positions", "hook", "alpha"],
)
def test_bad_specifications_are_refused_with_a_clear_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        Steering(**kwargs)


def test_position_mask_for_generated_tokens_uses_the_prompt_width():
    mask = position_mask(
        "generated",
        columns=torch.arange(3, 5),
        first_real=torch.zeros(2, dtype=torch.long),
        prompt_len=4,
    )
    assert mask[..., 0].tolist() == [[False, True], [False, True]]


def test_position_mask_from_an_index_counts_from_the_first_real_token():
    mask = position_mask(
        1, columns=torch.arange(3), first_real=torch.tensor([0, 2]), prompt_len=3
    )
    assert mask[..., 0].tolist() == [[False, True, True], [False, False, False]]


def test_an_empty_steering_is_refused_when_built():
    with pytest.raises(LayerError, match="at least one"):
        Steering(errors=torch.randn(0, 4), layers=())


def test_numpy_numbers_work_as_strength_and_gains():
    import numpy as np

    steering = Steering(
        errors=torch.randn(1, 4),
        layers=(2,),
        alpha=np.float64(0.5),
        gains=Gains(kp=np.float64(1.0), integral_bound=np.float64(2.0)),
    )
    assert steering.layers == (2,) and steering.alpha == 0.5
    assert isinstance(steering.gains.integral_bound, float)


def test_a_single_int_layer_is_accepted():
    assert Steering(errors=torch.randn(1, 4), layers=3).layers == (3,)


def test_a_float_layer_is_a_type_error_that_names_the_type():
    with pytest.raises(TypeError, match="float"):
        Steering(errors=torch.randn(1, 4), layers=(1.0,))
