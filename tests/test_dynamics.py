import warnings

import pytest
import torch
from torch import nn

from controllens.controllers import Gains
from controllens.dynamics import (
    ErrorDynamics,
    StabilityWarning,
    block_gains,
    check_gains,
    error_dynamics,
    first_overshoot,
    plot_error_dynamics,
    simulate_loop,
    transition_matrix,
)
from controllens.errors import DataError, ModelError, VectorError
from controllens.operators import Ablate
from controllens.sequential import sequential_steering
from controllens.steering import Steering
from controllens.testing import tiny_llama, tiny_tokenizer
from controllens.vectors import contrastive_means

TARGET = ["so good and fine", "lovely day", "a joy to see it", "great fun"]
SOURCE = ["bad one", "awful film really", "dull", "a mess of a thing"]


def _identity_blocks(n_layers: int = 3) -> nn.Module:
    """A tiny Llama whose blocks return their input: J_k = I, g_k = 1 exactly."""
    model = tiny_llama(n_layers=n_layers)
    for layer in model.model.layers:
        nn.init.zeros_(layer.self_attn.o_proj.weight)
        nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


def _bridge(hf_model: nn.Module):
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            "tiny-llama", hf_model=hf_model, tokenizer=tiny_tokenizer()
        )


@pytest.fixture(scope="module")
def identity_bridge():
    return _bridge(_identity_blocks(n_layers=6))


@pytest.fixture(scope="module")
def tiny_means(tiny_bridge):
    return contrastive_means(tiny_bridge, target=TARGET, source=SOURCE, progress=False)


def _measure(model, steerings, **kwargs):
    return error_dynamics(model, steerings, target=TARGET, source=SOURCE, **kwargs)


# ---------------------------------------------------------------- measuring


@pytest.mark.parametrize(
    "changes",
    [{"alpha": 0.0}, {"gains": Gains(kp=0.0)}, {"positions": "generated"}],
    ids=["alpha-0", "zero-gains", "generated-only"],
)
def test_a_steering_that_changes_nothing_leaves_the_clean_error(
    tiny_bridge, tiny_means, changes
):
    steering = Steering.from_means(tiny_means, alpha=2.0).replace(**changes)
    (result,) = _measure(tiny_bridge, steering).values()
    torch.testing.assert_close(result.errors, tiny_means.r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.clean, tiny_means.r, atol=1e-6, rtol=1e-5)
    assert result.steady_state == pytest.approx(1.0)
    torch.testing.assert_close(
        result.inner_normalised[0], torch.tensor(1.0, dtype=torch.float64)
    )


def test_the_first_steered_layer_keeps_exactly_one_minus_alpha_kp(
    tiny_bridge, tiny_means
):
    steering = Steering.from_means(tiny_means, layers=(1,), gains=Gains.p(2.0))
    steering = steering.replace(alpha=0.25)
    result = _measure(tiny_bridge, steering)["P"]
    remaining = result.remaining.tolist()
    assert remaining[0] == pytest.approx(1.0, abs=1e-6)  # before the steering
    assert remaining[1] == pytest.approx(0.5, abs=1e-5)
    assert result.predicted[1].item() == pytest.approx(0.5, abs=1e-6)
    assert result.layers == (0, 1, 2) and result.steered == (1,)


def test_block_gains_match_finite_differences_of_a_real_push(tiny_bridge, tiny_means):
    projection, norm = block_gains(tiny_bridge, SOURCE, tiny_means.r)
    d0 = tiny_means.r[0] / tiny_means.r[0].norm()
    eps = 1e-3

    def mean_at_layer_1(sign: float) -> torch.Tensor:
        push = Steering(errors=sign * eps * d0[None], layers=(0,))
        (result,) = _measure(tiny_bridge, push, predict=False).values()
        return result.clean[1] - result.errors[1]  # the steered source's mean shift

    pushed = (mean_at_layer_1(1.0) - mean_at_layer_1(-1.0)).double() / (2 * eps)
    d1 = tiny_means.r[1].double() / tiny_means.r[1].double().norm()
    assert norm[1].item() == pytest.approx(pushed.norm().item(), rel=2e-3)
    assert projection[1].item() == pytest.approx((pushed @ d1).item(), rel=2e-3)
    # the point of the check: a real block is not the identity
    assert abs(norm[1].item() - 1.0) > 1e-2


class _Scale(nn.Module):
    """A linear 'decoder layer' x -> c x, whatever the layer kwargs."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states * self.factor


@pytest.mark.parametrize(
    "hook_point, expected", [("resid_post", [1, 3, -0.5]), ("resid_pre", [1, 2, 3])]
)
def test_block_gains_of_linear_layers_are_their_factors(hook_point, expected):
    model = tiny_llama()
    model.model.layers = nn.ModuleList(_Scale(c) for c in (2.0, 3.0, -0.5))
    directions = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    projection, norm = block_gains(
        model, SOURCE, directions, tokenizer=tiny_tokenizer(), hook_point=hook_point
    )
    units = directions.double() / directions.double().norm(dim=-1, keepdim=True)
    cosines = torch.cat([torch.ones(1).double(), (units[1:] * units[:-1]).sum(-1)])
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(norm, expected.abs())
    torch.testing.assert_close(projection, expected * cosines)


@pytest.mark.parametrize(
    "gains",
    [Gains.p(1.0), Gains.pi(1.0, 0.5), Gains.pd(1.0, 0.5), Gains.pid(1.0, 0.5, 0.25)],
    ids=["P", "PI", "PD", "PID"],
)
def test_on_identity_blocks_the_loop_model_is_exact(identity_bridge, gains):
    means = contrastive_means(
        identity_bridge, target=TARGET, source=SOURCE, progress=False
    )
    steering = Steering.from_means(means, gains=gains, alpha=0.3)
    result = _measure(identity_bridge, steering)[gains.name]
    torch.testing.assert_close(result.loop_gains, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(result.remaining, result.predicted, atol=1e-5, rtol=0)
    if gains.name == "P":
        # fixed pushes accumulate in the residual stream: 1 - alpha kp (k + 1)
        expected = [0.7, 0.4, 0.1, -0.2, -0.5, -0.8]
        assert result.remaining.tolist() == pytest.approx(expected, abs=1e-5)
        for overshoot in (result.overshoot, result.predicted_overshoot):
            assert (overshoot.layer, overshoot.peak_layer) == (3, 5)
            assert overshoot.peak == pytest.approx(-0.8, abs=1e-5)


def test_sequential_steering_on_identity_blocks_follows_the_closed_loop(
    identity_bridge,
):
    steering = sequential_steering(
        _identity_blocks(n_layers=6),
        target=TARGET,
        source=SOURCE,
        tokenizer=tiny_tokenizer(),
        gains=Gains.p(1.0),
        alpha=0.6,
        progress=False,
    )
    result = _measure(identity_bridge, steering)["P"]
    expected = [0.4**k for k in range(1, 7)]  # e_post(k) = (1 - alpha kp) e_post(k-1)
    assert result.remaining.tolist() == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(
        result.predicted_sequential, result.remaining, atol=1e-5, rtol=0
    )
    assert result.stability.spectral_radius == pytest.approx(0.4)


def test_an_edit_other_than_addition_is_measured_but_not_predicted(
    tiny_bridge, tiny_means
):
    steering = Steering(errors=tiny_means.r, layers=(0, 1, 2), operator=Ablate())
    result = _measure(tiny_bridge, steering)["P"]
    assert not torch.allclose(result.errors, tiny_means.r, atol=1e-4)
    assert result.predicted is None and result.stability is None


def test_gains_that_diverge_warn_when_measured(identity_bridge):
    means = contrastive_means(
        identity_bridge, target=TARGET, source=SOURCE, progress=False
    )
    steerings = {
        "gentle": Steering.from_means(means, alpha=0.5),
        "wild": Steering.from_means(means, alpha=3.0),
    }
    with pytest.warns(StabilityWarning, match="wild gains") as caught:
        results = _measure(identity_bridge, steerings)
    assert len(caught) == 1
    assert results["wild"].stability.spectral_radius == pytest.approx(2.0)
    assert results["gentle"].stability.stable


def test_several_steerings_are_named_after_their_gains(tiny_bridge, tiny_means):
    steerings = [
        Steering.from_means(tiny_means, gains=gains, alpha=0.5)
        for gains in (Gains.p(), Gains.pid(1.0, 0.1, 0.1))
    ]
    results = _measure(tiny_bridge, steerings, predict=False)
    assert list(results) == ["P", "PID"]
    assert results["PID"].predicted is None


def test_known_means_replace_the_unsteered_passes(tiny_bridge, tiny_means):
    steering = Steering.from_means(tiny_means, alpha=0.5)
    given = _measure(tiny_bridge, steering, means=tiny_means)["P"]
    measured = _measure(tiny_bridge, steering)["P"]
    torch.testing.assert_close(given.remaining, measured.remaining)


@pytest.mark.parametrize(
    "model, steerings, kwargs, error, match",
    [
        ("nnsight", "P", {}, ModelError, "TransformerLens"),
        ("bridge", "narrow", {}, VectorError, "width"),
        ("bridge", "two hook points", {}, ValueError, "one hook point"),
        ("bridge", "same name", {}, ValueError, "mapping"),
        ("bridge", "none", {}, ValueError, "at least one"),
        ("bridge", "P", {"loop_gain": "spectral"}, (ValueError, TypeError), "norm"),
        ("bridge", "P", {"gain_texts": 0}, ValueError, "gain_texts"),
        ("bridge", "P", {"means": "other texts"}, DataError, "these texts"),
    ],
    ids=[
        "nnsight",
        "width",
        "hook-points",
        "names",
        "empty",
        "loop-gain",
        "gain-texts",
        "means",
    ],
)
def test_bad_measurements_are_refused_with_a_clear_message(
    tiny_bridge, tiny_nnsight, tiny_means, model, steerings, kwargs, error, match
):
    p = Steering.from_means(tiny_means, alpha=0.5)
    choices = {
        "P": p,
        "narrow": Steering(errors=torch.randn(1, 8), layers=(0,)),
        "two hook points": {"a": p, "b": p.replace(hook_point="resid_pre")},
        "same name": [p, p.replace(alpha=1.0)],
        "none": [],
    }
    if kwargs.get("means") == "other texts":
        kwargs = {
            "means": contrastive_means(
                tiny_bridge, target=TARGET[:2], source=SOURCE, progress=False
            )
        }
    chosen = tiny_nnsight if model == "nnsight" else tiny_bridge
    with pytest.raises(error, match=match):
        _measure(chosen, choices[steerings], **kwargs)


def test_block_gains_refuse_directions_of_the_wrong_shape(tiny_bridge):
    with pytest.raises(VectorError, match=r"\(3, 32\)"):
        block_gains(tiny_bridge, SOURCE, torch.randn(2, 32))
    with pytest.raises(DataError, match="non-empty"):
        block_gains(tiny_bridge, [], torch.randn(3, 32))


# ---------------------------------------------------------------- the loop


def test_the_simulated_pid_loop_matches_a_hand_computed_recursion():
    # e_pre = g e_post(prev); u = .5 e + .25 sum_{j<k} e + .5 (e - e_prev)
    # k0: e=1,     u=.5,                          e_post=.5
    # k1: e=2*.5,  u=.5 + .25*1 + .5*0 = .75,     e_post=.25
    # k2: e=.125,  u=.0625 + .25*2 + .5*(-.875),  e_post=0
    loop = simulate_loop(
        Gains.pid(kp=0.5, ki=0.25, kd=0.5),
        torch.tensor([1.0, 2.0, 0.5]),
        alpha=1.0,
    )
    assert loop.e_pre.tolist() == [1.0, 1.0, 0.125]
    assert loop.control.tolist() == [0.5, 0.75, 0.125]
    assert loop.e_post.tolist() == [0.5, 0.25, 0.0]


def test_the_simulated_p_loop_is_a_geometric_series():
    g = torch.tensor([1.0, 1.2, 0.9, 1.1, 1.0])
    loop = simulate_loop(Gains.p(2.0), g, alpha=0.2, initial=3.0)
    expected = 3.0 * torch.cumprod(0.6 * g.double(), 0)
    torch.testing.assert_close(loop.e_post, expected)


def test_open_loop_control_and_disturbance_enter_as_fixed_inputs():
    loop = simulate_loop(
        Gains.p(),
        torch.ones(3),
        alpha=0.5,
        initial=1.0,
        steered=torch.tensor([True, False, True]),
        disturbance=torch.tensor([0.0, 1.0, 1.0]),
        control=torch.tensor([1.0, 9.0, 2.0]),
    )
    # 1 - .5*1 = .5; unsteered: .5 + 1 = 1.5; 1.5 + 1 - .5*2 = 1.5
    assert loop.e_post.tolist() == [0.5, 1.5, 1.5]
    assert loop.control.tolist() == [1.0, 0.0, 2.0]


def test_the_transition_matrix_steps_the_simulated_loop():
    gains, alpha, g = Gains.pid(kp=0.7, ki=0.3, kd=0.4), 0.8, 1.1
    loop = simulate_loop(gains, torch.full((8,), g), alpha=alpha)
    matrix = transition_matrix(gains, alpha=alpha, loop_gain=g)
    integral = loop.e_pre.cumsum(0)
    for k in range(7):
        state = torch.stack([loop.e_post[k], integral[k], loop.e_pre[k]])
        assert (matrix @ state)[0].item() == pytest.approx(loop.e_post[k + 1].item())


@pytest.mark.parametrize(
    "gains, alpha, loop_gain",
    [
        (Gains.p(2.5), 1.0, 1.0),
        (Gains.p(1.0), 3.0, 1.0),
        (Gains.pi(kp=1.0, ki=2.0), 1.0, 1.0),
        (Gains.pd(kp=1.0, kd=1.5), 1.0, 1.0),
        (Gains.pid(kp=0.5, ki=0.5, kd=1.0), 1.2, 1.0),
        (Gains.p(1.0), 2.2, 1.5),
    ],
    ids=["P", "P-alpha", "PI", "PD", "PID", "P-overcorrects-a-gain-above-1"],
)
def test_gains_that_must_diverge_warn(gains, alpha, loop_gain):
    with pytest.warns(StabilityWarning, match="unstable sequential loop"):
        stability = check_gains(gains, alpha=alpha, loop_gains=loop_gain)
    assert not stability.stable and stability.spectral_radius > 1
    loop = simulate_loop(gains, torch.full((200,), loop_gain), alpha=alpha)
    assert loop.e_post.abs().max() > 1e6


@pytest.mark.parametrize(
    "gains, alpha, loop_gain",
    [
        (Gains.p(1.9), 1.0, 1.0),
        (Gains.p(1.0), 1.0, 1.0),
        (Gains.pi(kp=1.0, ki=0.1), 0.5, 1.0),
        (Gains.pd(kp=1.0, kd=0.5), 0.5, 1.05),
        (Gains.pid(kp=0.9, ki=0.01, kd=0.01), 1.0, 1.0),
        (Gains.pid(kp=1.0, ki=0.02, kd=0.5), 0.1, 0.95),
    ],
    ids=["P-1.9", "P-deadbeat", "PI", "PD", "PID-paper", "PID-gentle"],
)
def test_stable_gains_do_not_warn_and_settle(gains, alpha, loop_gain):
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)
        stability = check_gains(gains, alpha=alpha, loop_gains=loop_gain)
    assert stability.stable and stability.spectral_radius <= 1
    loop = simulate_loop(gains, torch.full((400,), loop_gain), alpha=alpha)
    assert loop.e_post[-50:].abs().max() < 1e-3


def test_a_growing_model_is_unstable_but_not_blamed_on_gentle_gains():
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)
        stability = check_gains(Gains.p(1.0), alpha=0.1, loop_gains=1.2)
    assert not stability.stable and not stability.caused_by_gains
    assert stability.spectral_radius == pytest.approx(1.08)


def test_the_loop_gain_between_steered_layers_is_the_product_over_the_gap():
    g = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    steered = torch.tensor([True, False, True, False, True])
    stability = check_gains(Gains.p(1.0), alpha=0.5, loop_gains=g, steered=steered)
    assert stability.mean_gain == pytest.approx((1.0 + 3.0) / 2)


def test_first_overshoot_finds_the_first_excursion_and_its_peak():
    curve = torch.tensor([1.0, 0.2, -0.1, -0.4, -0.2, 0.3, -2.0])
    overshoot = first_overshoot(curve, layers=range(10, 17))
    assert (overshoot.layer, overshoot.peak, overshoot.peak_layer) == (
        12,
        pytest.approx(-0.4),
        13,
    )
    assert first_overshoot(-curve, sign=-1.0).layer == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        # jaxtyping answers shape errors first in the test run; both name them
        ({"loop_gains": torch.ones(2, 2)}, (ValueError, TypeError), "loop_gains"),
        ({"loop_gains": torch.tensor([1.0, float("nan")])}, ValueError, "finite"),
        ({"disturbance": torch.ones(3)}, (ValueError, TypeError), "disturbance"),
        ({"control": torch.ones(5)}, (ValueError, TypeError), "control"),
        ({"steered": torch.tensor([True])}, (ValueError, TypeError), "steered"),
        ({"steered": torch.zeros(2, dtype=torch.bool)}, ValueError, "at least one"),
        ({"alpha": float("inf")}, ValueError, "finite"),
        ({"gains": (1.0, 0.0, 0.0)}, TypeError, "Gains"),
    ],
    ids=[
        "2d",
        "nan",
        "disturbance",
        "control",
        "steered",
        "none-steered",
        "alpha",
        "gains",
    ],
)
def test_bad_loops_are_refused_with_a_clear_message(kwargs, error, match):
    options = {"gains": Gains.p(), "loop_gains": torch.ones(2), "alpha": 1.0}
    with pytest.raises(error, match=match):
        simulate_loop(**(options | kwargs))


def test_check_gains_refuses_a_steered_mask_of_another_length():
    with pytest.raises((ValueError, TypeError), match="steered"):
        check_gains(Gains.p(), loop_gains=torch.ones(3), steered=torch.ones(2) > 0)


# ---------------------------------------------------------------- reporting


def test_the_figure_has_one_curve_per_controller_and_is_saved(tmp_path):
    clean = torch.ones(4, 3)
    results = [
        ErrorDynamics(
            name=name,
            gains=Gains.p(),
            alpha=alpha,
            layers=(0, 1, 2, 3),
            steered=(0, 1, 2, 3),
            errors=(1 - alpha) * clean,
            clean=clean,
            predicted=torch.full((4,), 1 - alpha, dtype=torch.float64),
        )
        for name, alpha in (("P", 0.5), ("PI", 0.2))
    ]
    figure = plot_error_dynamics(results, tmp_path / "dynamics.png")
    paper, remaining = figure.axes
    assert len(paper.get_lines()) == 2 + 1  # two controllers and the zero line
    assert len(remaining.get_legend().get_texts()) == 3  # + "predicted"
    assert (tmp_path / "dynamics.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least one"):
        plot_error_dynamics([])


def test_the_summary_is_plain_json():
    import json

    result = ErrorDynamics(
        name="P",
        gains=Gains.p(),
        alpha=0.5,
        layers=(0, 1),
        steered=(0, 1),
        errors=torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),
        clean=torch.tensor([[2.0, 0.0], [2.0, 0.0]]),
    )
    summary = json.loads(json.dumps(result.summary()))
    assert summary["steady_state"] == -0.5
    assert summary["overshoot"] == {"layer": 1, "peak": -0.5, "peak_layer": 1}
    assert summary["predicted"] is None


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_on_smollm2_the_loop_predicts_where_fixed_p_steering_ends(smol_bridge):
    from controllens.data import load_labelled_tsv
    from tests.conftest import data_path

    data = load_labelled_tsv(data_path("sst2", "train_sample.tsv"), limit=24)
    means = contrastive_means(smol_bridge, data, progress=False)
    steerings = {
        "unsteered": Steering.from_means(means, alpha=0.0),
        "P": Steering.from_means(means, gains=Gains.p(1.0), alpha=0.1),
    }
    results = error_dynamics(smol_bridge, steerings, data, means=means, gain_texts=8)

    unsteered, p = results["unsteered"], results["P"]
    torch.testing.assert_close(unsteered.errors, means.r, atol=1e-4, rtol=1e-4)
    # measured -0.62, predicted -0.55, every layer within 0.18 (2026-12, these
    # 24 + 24 texts); benchmarks/error_dynamics.py has larger samples
    assert p.steady_state < 0 and p.overshoot is not None
    assert abs(p.steady_state - p.predicted_steady_state) < 0.2
    assert (p.remaining - p.predicted).abs().max() < 0.3
    assert p.stability.stable and 0.8 < p.stability.mean_gain < 1.2
