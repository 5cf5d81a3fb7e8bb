import pytest
import torch

from controllens.controllers import Gains
from controllens.errors import LayerError, VectorError
from controllens.steering import Steering

TOKENS = torch.tensor([[1, 20, 30, 40, 50, 60]])


def _steering(model, layers=(0, 1, 2), **kwargs):
    generator = torch.Generator().manual_seed(0)
    errors = torch.randn(len(layers), model.cfg.d_model, generator=generator)
    return Steering(errors=errors, layers=layers, **kwargs)


def test_p_steering_equals_a_hand_written_additive_hook_exactly(tiny_bridge):
    steering = _steering(tiny_bridge, layers=(1,), gains=Gains.p(1.0), alpha=3.0)
    vector = 3.0 * steering.errors[0]

    def by_hand(activation, hook):
        return activation + vector

    expected = tiny_bridge.run_with_hooks(
        TOKENS, fwd_hooks=[("blocks.1.hook_resid_post", by_hand)]
    )
    steered = tiny_bridge.run_with_hooks(TOKENS, fwd_hooks=steering.hooks(tiny_bridge))
    assert torch.equal(steered, expected)


@pytest.mark.parametrize(
    "change",
    [{"gains": Gains(kp=0.0)}, {"alpha": 0.0}],
    ids=["zero-gains", "zero-alpha"],
)
def test_zero_strength_is_bit_identical_to_the_unsteered_model(tiny_bridge, change):
    steering = _steering(tiny_bridge, gains=Gains.pid()).replace(**change)
    clean = tiny_bridge(TOKENS)
    with steering.apply(tiny_bridge):
        steered = tiny_bridge(TOKENS)
    assert torch.equal(steered, clean)


def test_using_a_steering_never_changes_its_stored_errors(tiny_bridge):
    steering = _steering(tiny_bridge, gains=Gains.pid())
    before = steering.errors.clone()
    with steering.apply(tiny_bridge):
        tiny_bridge(TOKENS)
        tiny_bridge.generate(TOKENS, max_new_tokens=2, verbose=False)
    assert torch.equal(steering.errors, before)


def test_hooks_are_removed_when_the_forward_raises(tiny_bridge):
    clean = tiny_bridge(TOKENS)
    steering = _steering(tiny_bridge, alpha=5.0)

    def failing(activation, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        with steering.apply(tiny_bridge):
            tiny_bridge.run_with_hooks(
                TOKENS, fwd_hooks=[("blocks.2.hook_resid_post", failing)]
            )
    assert torch.equal(tiny_bridge(TOKENS), clean)


def test_steering_composes_with_the_users_own_hooks(tiny_bridge):
    steering = _steering(tiny_bridge, layers=(0,), alpha=2.0)
    seen = {}

    def record(activation, hook):
        seen["resid"] = activation.clone()
        return activation

    tiny_bridge.run_with_hooks(
        TOKENS,
        fwd_hooks=[*steering.hooks(tiny_bridge), ("blocks.0.hook_resid_post", record)],
    )
    clean = tiny_bridge.run_with_cache(TOKENS)[1]["blocks.0.hook_resid_post"]
    torch.testing.assert_close(seen["resid"], clean + 2.0 * steering.errors[0])


def test_every_generated_token_is_steered_with_the_kv_cache(tiny_bridge):
    steering = _steering(tiny_bridge, layers=(1,), alpha=2.0)
    calls = []

    def count(activation, hook):
        calls.append(activation.shape[1])
        return activation

    hooks = [*steering.hooks(tiny_bridge), ("blocks.1.hook_resid_pre", count)]
    with tiny_bridge.hooks(fwd_hooks=hooks):
        tiny_bridge.generate(TOKENS, max_new_tokens=5, verbose=False, do_sample=False)
    # one prompt pass, then one pass per new token that is fed back
    assert calls == [TOKENS.shape[1], 1, 1, 1, 1]


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_prompt_and_generated_positions_split_the_kv_cache_calls(
    tiny_bridge, positions
):
    steering = _steering(tiny_bridge, layers=(1,), alpha=2.0, positions=positions)
    deltas = []

    def measure(activation, hook):
        deltas.append(activation.clone())
        return activation

    with tiny_bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_post", measure)]):
        tiny_bridge.generate(TOKENS, max_new_tokens=3, verbose=False, do_sample=False)
    clean = deltas[:]
    deltas.clear()
    hooks = [*steering.hooks(tiny_bridge), ("blocks.1.hook_resid_post", measure)]
    with tiny_bridge.hooks(fwd_hooks=hooks):
        # the hook order puts steering first, so `measure` sees the edit
        tiny_bridge.generate(TOKENS, max_new_tokens=3, verbose=False, do_sample=False)
    prompt_changed = not torch.equal(deltas[0], clean[0])
    assert prompt_changed == (positions == "prompt")
    if positions == "generated":
        assert not torch.equal(deltas[1], clean[1])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_and_single_prompt_results_agree_under_padding(
    tiny_bridge, padding_side
):
    steering = _steering(tiny_bridge, gains=Gains.pid(), alpha=2.0, positions=1)
    rows = [[1, 20, 30, 40, 50, 60], [1, 22, 33, 44]]
    width = max(map(len, rows))
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = (
            slice(width - len(row), width)
            if padding_side == "left"
            else slice(0, len(row))
        )
        batch[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    batched = tiny_bridge.run_with_hooks(
        batch,
        attention_mask=mask,
        fwd_hooks=steering.hooks(tiny_bridge, attention_mask=mask),
    )
    for i, row in enumerate(rows):
        single = tiny_bridge.run_with_hooks(
            torch.tensor([row]), fwd_hooks=steering.hooks(tiny_bridge)
        )
        real = mask[i].bool()
        torch.testing.assert_close(batched[i][real], single[0], atol=1e-5, rtol=1e-5)


def test_a_vector_of_the_wrong_width_is_refused_before_any_forward(tiny_bridge):
    steering = Steering(errors=torch.randn(1, 7), layers=(0,))
    with pytest.raises(VectorError, match="width 7 but the model's d_model is 32"):
        steering.hooks(tiny_bridge)


def test_a_layer_outside_the_model_is_refused_with_the_valid_range(tiny_bridge):
    steering = Steering(errors=torch.randn(1, 32), layers=(7,))
    with pytest.raises(LayerError, match=r"0\.\.2"):
        steering.hooks(tiny_bridge)


def test_a_half_precision_model_gets_the_vector_cast_to_its_dtype(tiny_bridge):
    steering = _steering(tiny_bridge, layers=(0,))
    hook = steering.hooks(tiny_bridge)[0][1]
    activation = torch.randn(1, 3, 32, dtype=torch.bfloat16)
    out = hook(activation, None)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_each_generation_inside_one_apply_block_starts_a_new_sequence(
    tiny_bridge, positions
):
    steering = _steering(tiny_bridge, alpha=5.0, positions=positions)
    first, second = torch.tensor([[1, 20, 30, 40]]), torch.tensor([[1] + [25] * 7])
    kwargs = dict(max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
    with steering.apply(tiny_bridge):
        tiny_bridge.generate(first, **kwargs)
        after_another = tiny_bridge.generate(second, **kwargs)
    with steering.apply(tiny_bridge):
        fresh = tiny_bridge.generate(second, **kwargs)
    assert after_another.tolist() == fresh.tolist()


def test_hooks_for_a_model_that_is_not_transformer_lens_say_what_to_use(tiny_hf):
    from controllens.errors import ModelError

    steering = Steering(errors=torch.randn(1, 32), layers=(0,))
    with pytest.raises(ModelError, match="load_bridge"):
        steering.hooks(tiny_hf)
    with pytest.raises(ModelError, match="load_bridge"):
        steering.hooks("gpt2")
