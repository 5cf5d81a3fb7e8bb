"""Every steering method as an operator: its invariants and both back ends."""

import math

import pytest
import torch

from controllens.controllers import Gains
from controllens.errors import HookPointError, VectorError
from controllens.operators import Ablate, Add, Feedback, Rotate, Transport
from controllens.steering import Steering, compose
from tests.test_interventions import MASK, TOKENS, _nnsight_generate, _nnsight_logits

D_MODEL = 32
LAYERS = (0, 1, 2)
# real tokens after each row's first one (TOKENS is left-padded)
AFTER_FIRST = MASK.bool() & (MASK.cumsum(dim=1) > 1)


def _random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _operator(name):
    if name == "add":
        return Add()
    if name == "ablate":
        return Ablate()
    if name == "ablate_add":
        return Ablate(add=True)
    if name == "transport":
        scale = 0.5 + _random(3, D_MODEL, seed=1).abs()
        return Transport(layers=LAYERS, scale=scale, source_mean=_random(3, 32, seed=2))
    if name == "rotate":
        return Rotate(angle=60.0, layers=LAYERS, axes=_random(3, D_MODEL, seed=3))
    assert name == "feedback"
    return Feedback(layers=LAYERS, setpoints=torch.tensor([1.0, 2.0, 3.0]))


OPERATORS = ("add", "ablate", "ablate_add", "transport", "rotate", "feedback")


def _steering(name, **kwargs):
    kwargs.setdefault("alpha", 1.0)
    kwargs.setdefault("gains", Gains.pid(kp=1.0, ki=0.2, kd=0.3))
    return Steering(
        errors=_random(3, D_MODEL, seed=0),
        layers=LAYERS,
        operator=_operator(name),
        **kwargs,
    )


def _read_steered(model, steering, layer):
    """The activation at ``layer`` after the steering's edit (TransformerLens)."""
    seen = {}

    def read(activation, hook):
        seen["x"] = activation.detach().clone()

    name = f"blocks.{layer}.hook_resid_post"
    model.run_with_hooks(
        TOKENS,
        attention_mask=MASK,
        fwd_hooks=[*steering.hooks(model, attention_mask=MASK), (name, read)],
    )
    return seen["x"]


@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.parametrize(
    "change", [{"alpha": 0.0}, {"gains": Gains(kp=0.0)}], ids=["alpha", "gains"]
)
def test_zero_strength_or_gains_is_bit_identical_in_both_back_ends(
    tiny_bridge, tiny_nnsight, name, change
):
    steering = _steering(name, **change)
    assert steering.is_identity
    clean = tiny_bridge(TOKENS, attention_mask=MASK)
    steered = tiny_bridge.run_with_hooks(
        TOKENS, attention_mask=MASK, fwd_hooks=steering.hooks(tiny_bridge)
    )
    assert torch.equal(steered, clean)
    clean_nn = _nnsight_logits(tiny_nnsight, None)
    assert torch.equal(_nnsight_logits(tiny_nnsight, steering), clean_nn)


def test_a_zero_angle_rotation_is_bit_identical(tiny_bridge):
    steering = _steering("rotate").replace(
        operator=Rotate(angle=0.0, layers=LAYERS, axes=_random(3, D_MODEL, seed=3))
    )
    assert steering.is_identity
    clean = tiny_bridge(TOKENS, attention_mask=MASK)
    assert torch.equal(
        tiny_bridge.run_with_hooks(
            TOKENS, attention_mask=MASK, fwd_hooks=steering.hooks(tiny_bridge)
        ),
        clean,
    )


@pytest.mark.parametrize("name", OPERATORS)
@pytest.mark.parametrize("positions", ["all", 2])
def test_both_back_ends_agree_on_logits_and_greedy_tokens(
    tiny_bridge, tiny_nnsight, name, positions
):
    steering = _steering(name, alpha=0.7, positions=positions)
    tl_logits = tiny_bridge.run_with_hooks(
        TOKENS,
        attention_mask=MASK,
        fwd_hooks=steering.hooks(tiny_bridge, attention_mask=MASK),
    )
    assert not torch.allclose(tl_logits, tiny_bridge(TOKENS, attention_mask=MASK))
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
    # HF generate pads a row after its end-of-sequence token (id 2), TL does not
    for nn_row, tl_row in zip(nn_tokens.tolist(), tl_tokens.tolist(), strict=True):
        width = TOKENS.shape[1]
        end = tl_row.index(2, width) + 1 if 2 in tl_row[width:] else len(tl_row)
        assert nn_row[:end] == tl_row[:end]


@pytest.mark.parametrize("gains", [Gains.p(1.0), Gains.pid(1.0, 0.5, 0.5)])
def test_full_ablation_leaves_no_component_along_the_direction(tiny_bridge, gains):
    steering = _steering("ablate", gains=gains)
    for row, layer in enumerate(LAYERS):
        direction = steering.control()[row]
        if not direction.any():
            continue
        steered = _read_steered(tiny_bridge, steering, layer)
        projection = steered @ (direction / direction.norm())
        clean_scale = steered.norm(dim=-1)
        # every real token but the first (the attention sink, left alone)
        assert (projection.abs() <= 1e-5 * clean_scale)[AFTER_FIRST].all()


def test_ablate_then_add_sets_every_token_to_the_same_component(tiny_bridge):
    steering = _steering("ablate_add", gains=Gains.p(1.0), alpha=1.0)
    u = steering.control()[1]
    steered = _read_steered(tiny_bridge, steering, 1)
    projection = (steered @ (u / u.norm()))[AFTER_FIRST]
    torch.testing.assert_close(
        projection, torch.full_like(projection, u.norm().item()), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("name", ["ablate", "transport", "rotate", "feedback"])
def test_the_attention_sink_is_left_alone_by_operators_that_scale_with_x(
    tiny_bridge, tiny_nnsight, name
):
    steering = _steering(name, alpha=0.7)
    seen = {}

    def read(key):
        def hook(activation, hook):
            seen[key] = activation.detach().clone()

        return hook

    hook_name = "blocks.0.hook_resid_post"
    tiny_bridge.run_with_hooks(
        TOKENS,
        attention_mask=MASK,
        fwd_hooks=[
            (hook_name, read("before")),
            *steering.hooks(tiny_bridge, attention_mask=MASK),
            (hook_name, read("after")),
        ],
    )
    first = MASK.bool() & (MASK.cumsum(dim=1) == 1)
    assert torch.equal(seen["after"][first], seen["before"][first])
    assert not torch.allclose(seen["after"][AFTER_FIRST], seen["before"][AFTER_FIRST])


@pytest.mark.parametrize("angle", [30.0, -120.0, 180.0])
def test_rotation_preserves_every_token_norm(tiny_bridge, angle):
    operator = Rotate(angle=angle, layers=LAYERS, axes=_random(3, D_MODEL, seed=3))
    steering = _steering("rotate", gains=Gains.p(1.0)).replace(
        operator=operator, layers=(1,), errors=_random(1, D_MODEL, seed=0)
    )
    seen = {}

    def read(key):
        def hook(activation, hook):
            seen[key] = activation.detach().clone()

        return hook

    name = "blocks.1.hook_resid_post"
    tiny_bridge.run_with_hooks(
        TOKENS,
        attention_mask=MASK,
        fwd_hooks=[
            (name, read("before")),
            *steering.hooks(tiny_bridge),
            (name, read("after")),
        ],
    )
    after = seen["after"]
    torch.testing.assert_close(
        after.norm(dim=-1), seen["before"].norm(dim=-1), rtol=1e-5, atol=0
    )
    assert not torch.allclose(after, seen["before"])


def test_rotation_turns_the_in_plane_component_towards_the_direction():
    d, b = torch.eye(4)[0], torch.eye(4)[1]
    steering = Steering(
        errors=3 * d[None],
        layers=(0,),
        operator=Rotate(angle=30.0, layers=(0,), axes=(b + 0.5 * d)[None]),
    )
    x = torch.tensor([[[0.0, 2.0, 5.0, 0.0]]])
    out = steering.edit(0, x, None, {})[0, 0]
    expected = [2 * math.sin(math.radians(30)), 2 * math.cos(math.radians(30)), 5, 0]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_transport_with_unit_gain_maps_source_statistics_onto_the_target():
    source = _random(5000, 4, seed=5) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 1.0
    target = _random(5000, 4, seed=6) * torch.tensor([2.0, 1.0, 1.0, 0.5]) - 2.0
    scale = (target.var(0) / source.var(0)).sqrt()
    operator = Transport(
        layers=(0,), scale=scale[None], source_mean=source.mean(0)[None]
    )
    steering = Steering(
        errors=(target.mean(0) - source.mean(0))[None], layers=(0,), operator=operator
    )
    moved = steering.edit(0, source[None], None, {})[0]
    torch.testing.assert_close(moved.mean(0), target.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(moved.std(0), target.std(0), atol=1e-4, rtol=1e-4)


def test_feedback_leaves_tokens_at_the_setpoint_and_the_first_token_alone():
    operator = Feedback(layers=(0,), setpoints=torch.tensor([2.0]))
    steering = Steering(
        errors=torch.tensor([[2.0, 0.0]]), layers=(0,), operator=operator
    )
    x = torch.tensor([[[50.0, 1.0], [2.0, 7.0], [-1.0, 3.0], [4.0, 0.0]]])
    first = torch.tensor([[True, False, False, False]])
    out = steering.edit(0, x, None, {"first": first})
    expected = torch.tensor([[[50.0, 1.0], [2.0, 7.0], [2.0, 3.0], [4.0, 0.0]]])
    assert torch.equal(out, expected)

    two_sided = Steering(
        errors=torch.tensor([[2.0, 0.0]]),
        layers=(0,),
        operator=Feedback(layers=(0,), setpoints=torch.tensor([2.0]), one_sided=False),
    )
    out = two_sided.edit(0, x, None, {"first": first})
    assert out[0, 3, 0] == 2.0


def test_feedback_integrates_each_tokens_error_across_layers():
    operator = Feedback(layers=(0, 1), setpoints=torch.tensor([1.0, 1.0]))
    steering = Steering(
        errors=torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
        layers=(0, 1),
        gains=Gains.pi(kp=0.5, ki=1.0),
        operator=operator,
    )
    state = {}
    x = torch.zeros(1, 1, 2)
    after_0 = steering.edit(0, x, None, state)  # e = 1, u = 0.5
    after_1 = steering.edit(1, x, None, state)  # e = 1, u = 0.5 + 1.0 * 1
    assert after_0[0, 0, 0] == 0.5
    assert after_1[0, 0, 0] == 1.5


def test_composed_additions_sum_their_controls_in_both_modes(tiny_bridge):
    a = _steering("add", gains=Gains.p(1.0))
    b = Steering(errors=_random(1, D_MODEL, seed=9), layers=(1,), alpha=0.5)
    by_hand = Steering(
        errors=a.control()
        + torch.stack([torch.zeros(32), b.control()[0], torch.zeros(32)]),
        layers=LAYERS,
    )
    expected = tiny_bridge.run_with_hooks(TOKENS, fwd_hooks=by_hand.hooks(tiny_bridge))
    for mode in ("sum", "sequence"):
        both = compose(a, b, mode=mode)
        got = tiny_bridge.run_with_hooks(TOKENS, fwd_hooks=both.hooks(tiny_bridge))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sequence_order_matters_for_ablation_and_both_back_ends_agree(
    tiny_bridge, tiny_nnsight
):
    add = _steering("add", gains=Gains.p(1.0))
    ablate = _steering("ablate", gains=Gains.p(1.0))
    first_add = compose(add, ablate, mode="sequence")
    first_ablate = compose(ablate, add, mode="sequence")
    logits = [
        tiny_bridge.run_with_hooks(
            TOKENS,
            attention_mask=MASK,
            fwd_hooks=c.hooks(tiny_bridge, attention_mask=MASK),
        )
        for c in (first_add, first_ablate)
    ]
    assert not torch.allclose(logits[0], logits[1])
    real = MASK.bool()
    torch.testing.assert_close(
        _nnsight_logits(tiny_nnsight, first_add)[real],
        logits[0][real],
        atol=1e-4,
        rtol=0,
    )


def test_composition_rejects_mixed_hook_points_and_unknown_modes():
    a = _steering("add")
    with pytest.raises(HookPointError, match="hook points"):
        compose(a, a.replace(hook_point="resid_pre"))
    with pytest.raises((ValueError, TypeError), match="sum"):
        compose(a, mode="parallel")
    with pytest.raises(ValueError, match="at least one"):
        compose()


@pytest.mark.parametrize("angle", [181.0, -200.0, math.nan, True])
def test_an_angle_outside_its_range_is_refused(angle):
    with pytest.raises((ValueError, TypeError)):
        Rotate(angle=angle, layers=(0,), axes=torch.ones(1, 4))


def test_a_second_axis_parallel_to_the_direction_is_refused():
    r = _random(1, 8, seed=0)
    with pytest.raises(VectorError, match="parallel"):
        Steering(
            errors=r,
            layers=(0,),
            operator=Rotate(angle=10.0, layers=(0,), axes=-2 * r),
        )


def test_operator_data_for_other_layers_or_widths_is_refused():
    with pytest.raises(VectorError, match="no transport scales for layers"):
        _steering("add").replace(
            operator=Transport(
                layers=(0, 1), scale=torch.ones(2, 32), source_mean=torch.zeros(2, 32)
            )
        )
    with pytest.raises(VectorError, match="width 32"):
        _steering("add").replace(
            operator=Rotate(angle=5.0, layers=LAYERS, axes=torch.ones(3, 16))
        )
    with pytest.raises(VectorError, match="NaN"):
        Feedback(layers=(0,), setpoints=torch.tensor([math.nan]))


def test_an_unknown_method_names_the_valid_choices():
    from controllens.vectors import ContrastiveMeans

    means = ContrastiveMeans(
        mu_target=torch.randn(1, 8),
        mu_source=torch.randn(1, 8),
        layers=(0,),
        aggregation="mean",
        model_name="toy",
        n_layers=1,
        d_model=8,
        n_target=2,
        n_source=2,
    )
    with pytest.raises(ValueError, match="'add', 'caa', 'pca'"):
        Steering.from_means(means, method="steer-harder")
    with pytest.raises(VectorError, match="aggregation='last'"):
        Steering.from_means(means, method="caa")
    with pytest.raises(ValueError, match="angle="):
        Steering.from_means(means, method="rotate")
    feedback = Steering.from_means(means, method="feedback")
    direction = means.r[0] / means.r[0].norm()
    torch.testing.assert_close(
        feedback.operator.setpoints, (means.mu_target[0] @ direction)[None]
    )


def test_feedback_across_tokens_carries_the_kv_cache_like_one_full_pass(
    tiny_bridge, tiny_nnsight
):
    operator = Feedback(
        layers=LAYERS, setpoints=torch.tensor([1.0, 2.0, 3.0]), token_ki=0.5
    )
    steering = _steering("feedback", gains=Gains.pi(0.5, 0.2)).replace(
        operator=operator
    )
    with steering.apply(tiny_bridge, attention_mask=MASK):
        generated = tiny_bridge.generate(
            TOKENS,
            attention_mask=MASK,
            max_new_tokens=5,
            do_sample=False,
            verbose=False,
            stop_at_eos=False,
        )
    # one steered pass over the whole sequence: the same memory, as a cumsum
    full_mask = torch.cat([MASK, torch.ones(2, 5, dtype=MASK.dtype)], dim=1)
    logits = tiny_bridge.run_with_hooks(
        generated[:, :-1],
        attention_mask=full_mask[:, :-1],
        fwd_hooks=steering.hooks(tiny_bridge, attention_mask=full_mask[:, :-1]),
    )
    width = TOKENS.shape[1]
    assert logits[:, width - 1 :].argmax(-1).tolist() == generated[:, width:].tolist()
    without = steering.replace(
        operator=Feedback(layers=LAYERS, setpoints=torch.tensor([1.0, 2.0, 3.0]))
    )
    with without.apply(tiny_bridge, attention_mask=MASK):
        plain = tiny_bridge(TOKENS, attention_mask=MASK)
    with steering.apply(tiny_bridge, attention_mask=MASK):
        memory = tiny_bridge(TOKENS, attention_mask=MASK)
    assert not torch.allclose(plain[:, -1], memory[:, -1])
    nn_tokens = _nnsight_generate(tiny_nnsight, steering, 5)
    for nn_row, tl_row in zip(nn_tokens.tolist(), generated.tolist(), strict=True):
        end = tl_row.index(2, width) + 1 if 2 in tl_row[width:] else len(tl_row)
        assert nn_row[:end] == tl_row[:end]


@pytest.mark.parametrize("token_ki", [-1.0, math.inf])
def test_a_negative_or_infinite_token_gain_is_refused(token_ki):
    with pytest.raises(ValueError, match="token_ki"):
        Feedback(layers=(0,), setpoints=torch.ones(1), token_ki=token_ki)


@pytest.fixture(scope="module")
def smol_means(smol_hf):
    from controllens.data import load_labelled_tsv
    from controllens.vectors import contrastive_means
    from tests.conftest import data_path

    model, tokenizer = smol_hf
    data = load_labelled_tsv(data_path("sst2", "train_sample.tsv"), limit=24)
    return contrastive_means(
        model,
        data,
        tokenizer=tokenizer,
        layers=(4, 12, 20, 28),
        moments=True,
        progress=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "alpha", "extra"),
    [
        ("add", 0.5, {}),
        ("pca", 0.5, {}),
        ("ablate", 1.0, {}),
        ("ablate_add", 0.5, {}),
        ("transport", 0.5, {}),
        ("rotate", 1.0, {"angle": 40.0}),
        ("feedback", 0.5, {}),
    ],
)
def test_every_method_steers_smollm2_alike_in_both_back_ends(
    smol_bridge, smol_nnsight, smol_means, method, alpha, extra
):
    steering = Steering.from_means(
        smol_means,
        method=method,
        gains=Gains.pid(1.0, 0.1, 0.2),
        alpha=alpha,
        **extra,
    )
    ids = smol_bridge.tokenizer(
        ["The film was slow and", "I did not enjoy the acting, which"],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    tokens, mask = ids.input_ids, ids.attention_mask
    tl_logits = smol_bridge.run_with_hooks(
        tokens,
        attention_mask=mask,
        fwd_hooks=steering.hooks(smol_bridge, attention_mask=mask),
    )
    clean = smol_bridge(tokens, attention_mask=mask)
    real = mask.bool()
    assert (tl_logits[real] - clean[real]).abs().max() > 1e-2
    with smol_nnsight.trace(tokens, attention_mask=mask):
        steering.intervene(smol_nnsight)
        nn_logits = smol_nnsight.lm_head.output.save()
    torch.testing.assert_close(nn_logits[real], tl_logits[real], atol=1e-4, rtol=0)


def test_one_token_prompts_after_a_generation_in_one_apply_block_start_afresh(
    tiny_bridge,
):
    # the KV cache's length, not the call's width, says where a sequence starts
    steering = _steering("add", positions="prompt")
    options = dict(max_new_tokens=3, do_sample=False, verbose=False)
    prompt = torch.tensor([[1]])
    with steering.apply(tiny_bridge):
        fresh = tiny_bridge(prompt)
    with steering.apply(tiny_bridge):
        tiny_bridge.generate(TOKENS[:1], stop_at_eos=False, **options)
        reused = tiny_bridge(prompt)
    assert torch.equal(fresh, reused)
    assert not torch.equal(fresh, tiny_bridge(prompt))


def test_a_transport_from_a_source_without_spread_is_refused(tiny_hf):
    from controllens.testing import tiny_tokenizer
    from controllens.vectors import contrastive_means

    means = contrastive_means(
        tiny_hf,
        target=["so good", "lovely"],
        source=["awful film"],
        tokenizer=tiny_tokenizer(),
        moments=True,
        progress=False,
    )
    with pytest.raises(VectorError, match="no spread"):
        Steering.from_means(means, method="transport")


def test_feedback_across_tokens_acts_even_with_zero_layer_gains():
    operator = Feedback(layers=(0,), setpoints=torch.ones(1), token_ki=0.5)
    steering = Steering(
        errors=torch.ones(1, 4), layers=(0,), gains=Gains(kp=0.0), operator=operator
    )
    assert not steering.is_identity


def test_operators_reuse_what_they_derive_per_layer():
    steering = _steering("rotate", gains=Gains.p(1.0))
    x = _random(1, 3, D_MODEL, seed=4)
    first = steering.edit(1, x, None, {})
    assert any(key[0] == "rotate" for key in steering._derived)
    torch.testing.assert_close(steering.edit(1, x, None, {}), first)


def test_apply_reads_each_rows_first_token_from_the_models_attention_mask(
    tiny_bridge,
):
    steering = _steering("rotate")
    with steering.apply(tiny_bridge, attention_mask=MASK):
        given = tiny_bridge(TOKENS, attention_mask=MASK)
    with steering.apply(tiny_bridge):
        read = tiny_bridge(TOKENS, attention_mask=MASK)
    assert torch.equal(given, read)
