import pytest
import torch

from controllens.controllers import Gains
from controllens.errors import ModelError
from controllens.sequential import sequential_steering
from controllens.testing import tiny_llama, tiny_tokenizer
from controllens.vectors import contrastive_means

TARGET = ["so good and fine", "lovely day", "a joy to see it", "great fun"]
SOURCE = ["bad one", "awful film really", "dull", "a mess of a thing"]


def _estimate(model, **kwargs):
    options = dict(
        target=TARGET,
        source=SOURCE,
        tokenizer=tiny_tokenizer(),
        batch_size=3,
        progress=False,
    )
    return sequential_steering(model, **(options | kwargs))


@pytest.mark.parametrize("hook_point", ["resid_post", "resid_pre"])
def test_the_single_sweep_equals_one_pass_per_layer(tiny_hf, hook_point):
    options = dict(gains=Gains.pid(1.0, 0.3, 0.2), alpha=20.0, hook_point=hook_point)
    sweep = _estimate(tiny_hf, method="sweep", **options)
    per_layer = _estimate(tiny_hf, method="per_layer", **options)
    torch.testing.assert_close(sweep.errors, per_layer.errors, atol=1e-6, rtol=1e-5)


def test_without_steering_the_sequential_errors_are_the_clean_ones(tiny_hf):
    sequential = _estimate(tiny_hf, alpha=0.0)
    clean = contrastive_means(
        tiny_hf,
        target=TARGET,
        source=SOURCE,
        tokenizer=tiny_tokenizer(),
        progress=False,
    )
    torch.testing.assert_close(sequential.errors, clean.r, atol=1e-6, rtol=1e-5)


def test_steering_earlier_layers_changes_the_later_errors_only(tiny_hf):
    clean = _estimate(tiny_hf, alpha=0.0)
    steered = _estimate(tiny_hf, alpha=20.0)
    torch.testing.assert_close(steered.errors[0], clean.errors[0])
    assert not torch.allclose(steered.errors[1:], clean.errors[1:], atol=1e-4)


def test_the_result_keeps_the_gains_and_strength_used_to_estimate_it(tiny_hf):
    steering = _estimate(tiny_hf, gains=Gains.pi(), alpha=0.5, positions="generated")
    assert (steering.gains, steering.alpha, steering.positions) == (
        Gains.pi(),
        0.5,
        "generated",
    )
    assert steering.layers == (0, 1, 2) and steering.n_layers == 3


def test_the_sweep_refuses_models_whose_layers_use_different_masks():
    model = tiny_llama()
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    with pytest.raises(ModelError, match="method='per_layer'"):
        _estimate(model)


def test_an_unknown_method_names_the_valid_ones(tiny_hf):
    # beartype checks the Literal first in the test run; both name the choices
    with pytest.raises((ValueError, TypeError), match="sweep"):
        _estimate(tiny_hf, method="fast")
