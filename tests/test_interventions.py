import pytest
import torch

from controllens.controllers import Gains
from controllens.errors import ModelError
from controllens.steering import Steering

TOKENS = torch.tensor([[1, 20, 30, 40, 50], [0, 0, 1, 22, 33]])
MASK = (TOKENS != 0).long()


def _steering(**kwargs):
    errors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    return Steering(errors=errors, layers=(0, 1, 2), **kwargs)


def _nnsight_logits(model, steering):
    with model.trace(TOKENS, attention_mask=MASK):
        if steering is not None:
            steering.intervene(model)
        logits = model.lm_head.output.save()
    return logits


def _nnsight_generate(model, steering, n):
    with model.generate(max_new_tokens=n, do_sample=False) as tracer:
        with tracer.invoke(TOKENS, attention_mask=MASK):
            steering.intervene(model, tracer)
        with tracer.invoke():
            tokens = tracer.result.save()
    return tokens


def test_p_intervention_equals_a_hand_written_edit_exactly(tiny_nnsight):
    steering = _steering(gains=Gains.p(1.0), alpha=2.0).replace(
        errors=torch.randn(1, 32), layers=(1,)
    )
    vector = 2.0 * steering.errors[0]
    with tiny_nnsight.trace(TOKENS, attention_mask=MASK):
        layer = tiny_nnsight.model.layers[1]
        layer.output = layer.output + vector
        expected = tiny_nnsight.lm_head.output.save()
    assert torch.equal(_nnsight_logits(tiny_nnsight, steering), expected)


def test_zero_gains_leave_the_nnsight_model_bit_identical(tiny_nnsight):
    clean = _nnsight_logits(tiny_nnsight, None)
    steered = _nnsight_logits(tiny_nnsight, _steering(gains=Gains(kp=0.0)))
    assert torch.equal(steered, clean)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", 2])
@pytest.mark.parametrize("hook_point", ["resid_post", "resid_pre"])
def test_both_back_ends_give_the_same_logits_and_greedy_tokens(
    tiny_bridge, tiny_nnsight, positions, hook_point
):
    steering = _steering(
        gains=Gains.pid(), alpha=3.0, positions=positions, hook_point=hook_point
    )
    tl_logits = tiny_bridge.run_with_hooks(
        TOKENS,
        attention_mask=MASK,
        fwd_hooks=steering.hooks(tiny_bridge, attention_mask=MASK),
    )
    nn_logits = _nnsight_logits(tiny_nnsight, steering)
    real = MASK.bool()
    torch.testing.assert_close(nn_logits[real], tl_logits[real], atol=1e-4, rtol=0)

    with steering.apply(tiny_bridge, attention_mask=MASK):
        tl_tokens = tiny_bridge.generate(
            TOKENS,
            attention_mask=MASK,
            max_new_tokens=4,
            do_sample=False,
            verbose=False,
            stop_at_eos=False,
        )
    nn_tokens = _nnsight_generate(tiny_nnsight, steering, 4)
    assert nn_tokens.tolist() == tl_tokens.tolist()


def test_every_generation_step_is_steered_in_nnsight(tiny_nnsight):
    steering = _steering(alpha=5.0, positions="generated")
    unsteered = _nnsight_generate(tiny_nnsight, _steering(alpha=0.0), 4)
    steered = _nnsight_generate(tiny_nnsight, steering, 4)
    prompt = TOKENS.shape[1]
    # the first new token comes from the unsteered prompt pass
    assert torch.equal(steered[:, : prompt + 1], unsteered[:, : prompt + 1])
    assert not torch.equal(steered[:, prompt + 1 :], unsteered[:, prompt + 1 :])


def test_steer_refuses_a_transformer_lens_model(tiny_bridge):
    with pytest.raises(ModelError, match="steering.hooks"):
        _steering().intervene(tiny_bridge)


@pytest.mark.parametrize("positions", ["prompt", "generated", 2])
def test_an_unpadded_prompt_gets_the_same_positions_as_transformer_lens(
    tiny_bridge, tiny_nnsight, positions
):
    # without padding nnsight passes no attention mask: columns are counted
    tokens = torch.tensor([[1, 20, 30, 40, 50]])
    steering = _steering(alpha=5.0, positions=positions)
    with steering.apply(tiny_bridge):
        expected = tiny_bridge.generate(
            tokens,
            max_new_tokens=4,
            do_sample=False,
            verbose=False,
            stop_at_eos=False,
        )
    with tiny_nnsight.generate(max_new_tokens=4, do_sample=False) as tracer:
        with tracer.invoke(tokens):
            steering.intervene(tiny_nnsight, tracer)
        with tracer.invoke():
            got = tracer.result.save()
    assert got.tolist() == expected.tolist()
