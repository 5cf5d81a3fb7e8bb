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
    sweep = _estimate(tiny_hf, strategy="sweep", **options)
    per_layer = _estimate(tiny_hf, strategy="per_layer", **options)
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
    with pytest.raises(ModelError, match="strategy='per_layer'"):
        _estimate(model)


def test_an_unknown_method_or_strategy_names_the_valid_ones(tiny_hf):
    with pytest.raises(ValueError, match="'add', 'caa'"):
        _estimate(tiny_hf, method="fast")
    with pytest.raises(ValueError, match="pass strategy='sweep'"):
        _estimate(tiny_hf, method="sweep")
    # beartype checks the Literal first in the test run; both name the choices
    with pytest.raises((ValueError, TypeError), match="sweep"):
        _estimate(tiny_hf, strategy="fast")


METHOD_OPTIONS = {
    "add": {},
    "pca": {},
    "ablate": {"alpha": 0.5},
    "ablate_add": {},
    "transport": {"alpha": 0.5},
    "rotate": {"angle": 30.0, "alpha": 1.0},
    "feedback": {},
}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_every_method_gives_the_same_sequential_steering_by_both_strategies(
    tiny_hf, method
):
    options = {"gains": Gains.pid(1.0, 0.3, 0.2), "alpha": 5.0}
    options |= METHOD_OPTIONS[method] | {"method": method}
    sweep = _estimate(tiny_hf, strategy="sweep", **options)
    per_layer = _estimate(tiny_hf, strategy="per_layer", **options)
    assert sweep.operator.name == per_layer.operator.name
    torch.testing.assert_close(sweep.errors, per_layer.errors, atol=1e-5, rtol=1e-4)
    tokens = torch.tensor([[1, 20, 30, 40, 50]])
    steered = [
        _logits_with(tiny_hf, steering, tokens) for steering in (sweep, per_layer)
    ]
    torch.testing.assert_close(steered[0], steered[1], atol=1e-4, rtol=1e-4)
    clean = tiny_hf(tokens).logits
    assert not torch.allclose(steered[0], clean)


def test_sequential_statistics_differ_from_clean_ones_once_earlier_layers_steer(
    tiny_hf,
):
    sequential = _estimate(tiny_hf, method="transport", alpha=1.0)
    clean = contrastive_means(
        tiny_hf,
        target=TARGET,
        source=SOURCE,
        tokenizer=tiny_tokenizer(),
        moments=True,
        progress=False,
    )
    first = sequential.operator.scale[0]
    clean_scale = (clean.var_target[0] / clean.var_source[0]).sqrt()
    torch.testing.assert_close(first, clean_scale, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(
        sequential.operator.source_mean[2], clean.mu_source[2], atol=1e-3
    )


def _logits_with(model, steering, tokens):
    from controllens.adapters import decoder_layers
    from controllens.sequential import _register_edit

    modules = decoder_layers(model)[1]
    mask = torch.ones_like(tokens)
    state = {}
    handles = [
        _register_edit(modules[k], k, steering, mask, steering.hook_point, state)
        for k in steering.layers
    ]
    try:
        return model(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
