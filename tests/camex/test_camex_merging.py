"""Tests of controllens.camex.merging."""

import pytest
import torch
from jaxtyping import TypeCheckError

from controllens.camex.merging import (
    KroneckerCurvature,
    camex_merge,
    dare,
    ep_camex_merge,
    kronecker_sizes,
    smear_merge,
    stack_experts,
    task_vector_merge,
    task_vectors,
    ties_elect,
)
from controllens.errors import MergeError


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def test_stacking_experts_of_different_shapes_is_refused() -> None:
    with pytest.raises(MergeError, match="experts of one shape"):
        stack_experts([torch.zeros(3, 2), torch.zeros(2, 3)])


def test_routing_weights_over_the_wrong_number_of_experts_are_refused() -> None:
    with pytest.raises(MergeError, match="routing weights over 3"):
        smear_merge(torch.zeros(3, 2, 2), torch.ones(2))


def test_smear_with_one_hot_routing_returns_that_expert(gen) -> None:
    experts = randn(3, 4, 5, gen=gen)
    merged = smear_merge(experts, torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(merged[0], experts[1])


def test_camex_with_one_expert_alpha_one_and_identity_is_base_plus_task_vector(
    gen,
) -> None:
    base, expert = randn(6, 4, gen=gen), randn(6, 4, gen=gen)
    taus = task_vectors(base, expert[None])
    curvature = KroneckerCurvature(n_experts=1, d_out=6, d_in=4, rank=2)
    merged = camex_merge(base, taus, torch.ones(1), curvature, alpha=1.0)
    torch.testing.assert_close(merged, base + taus[0])
    torch.testing.assert_close(merged, expert)


@pytest.mark.parametrize("rank", [1, 3], ids=["rank1", "rank3"])
def test_camex_at_its_initial_identity_equals_flat_task_vector_merging(
    gen, rank
) -> None:
    base, experts = randn(6, 4, gen=gen), randn(3, 6, 4, gen=gen)
    taus = task_vectors(base, experts)
    routing = randn(5, 3, gen=gen).softmax(-1)
    curvature = KroneckerCurvature(n_experts=3, d_out=6, d_in=4, rank=rank)
    flat = task_vector_merge(base, taus, routing, alpha=0.7)
    torch.testing.assert_close(camex_merge(base, taus, routing, curvature, 0.7), flat)


def test_camex_with_every_factor_at_identity_scales_alpha_by_the_rank(gen) -> None:
    base, experts = randn(6, 4, gen=gen), randn(2, 6, 4, gen=gen)
    taus = task_vectors(base, experts)
    routing = torch.tensor([0.3, 0.7])
    curvature = KroneckerCurvature(n_experts=2, d_out=6, d_in=4, rank=3)
    curvature.set_identity()
    torch.testing.assert_close(
        camex_merge(base, taus, routing, curvature, alpha=0.5),
        task_vector_merge(base, taus, routing, alpha=1.5),
    )


def test_curvature_equals_the_explicit_kronecker_products(gen) -> None:
    curvature = KroneckerCurvature(
        n_experts=2, d_out=6, d_in=8, rank=2, out_factor=2, in_factor=4
    )
    with torch.no_grad():
        for factor in (curvature.P, curvature.Q, curvature.U, curvature.V):
            factor.copy_(randn(*factor.shape, gen=gen))
    taus = randn(2, 6, 8, gen=gen)
    expected = torch.stack(
        [
            sum(
                torch.kron(curvature.P[e, r], curvature.Q[e, r])
                @ taus[e]
                @ torch.kron(curvature.U[e, r], curvature.V[e, r]).T
                for r in range(2)
            )
            for e in range(2)
        ]
    )
    torch.testing.assert_close(curvature(taus), expected, rtol=1e-4, atol=1e-4)

    weights, coeffs = randn(3, 6, 8, gen=gen), randn(3, 2, gen=gen)
    looped = torch.stack(
        [
            sum(
                coeffs[g, e] * curvature(weights[g].expand(2, 6, 8))[e]
                for e in range(2)
            )
            for g in range(3)
        ]
    )
    torch.testing.assert_close(
        curvature.mix(weights, coeffs), looped, rtol=1e-4, atol=1e-4
    )


def test_a_kronecker_factor_that_does_not_divide_the_width_is_refused() -> None:
    with pytest.raises(MergeError, match="divides the width 10"):
        KroneckerCurvature(n_experts=2, d_out=10, d_in=4, out_factor=3)
    with pytest.raises(MergeError, match="divides the width 7"):
        kronecker_sizes(7, 2)


def test_default_kronecker_factors_sit_near_the_square_root() -> None:
    assert kronecker_sizes(1536) == (32, 48)
    assert kronecker_sizes(576) == (24, 24)
    assert kronecker_sizes(7) == (1, 7)


def test_ties_zeroes_entries_whose_sign_loses_the_election() -> None:
    taus = torch.tensor([[[1.0, -2.0, 0.5]], [[3.0, 1.0, -1.0]]])
    elected = ties_elect(taus)
    torch.testing.assert_close(
        elected, torch.tensor([[[1.0, -2.0, 0.0]], [[3.0, 0.0, -1.0]]])
    )


def test_ties_density_keeps_only_the_largest_entries() -> None:
    taus = torch.tensor([[[1.0, 4.0, 2.0, 3.0]]])
    torch.testing.assert_close(
        ties_elect(taus, density=0.5), torch.tensor([[[0.0, 4.0, 0.0, 3.0]]])
    )
    with pytest.raises(MergeError, match="density in"):
        ties_elect(taus, density=0.0)


def test_dare_keeps_the_expected_task_vector(gen) -> None:
    taus = torch.ones(1, 200, 200)
    dropped = dare(taus, drop=0.3, generator=gen)
    values = dropped.unique()
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / 0.7]))
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(MergeError, match=r"drop probability in \[0, 1\)"):
        dare(taus, drop=1.0)


def test_ep_camex_with_the_base_as_previous_equals_camex(gen) -> None:
    base, experts = randn(4, 6, gen=gen), randn(3, 4, 6, gen=gen)
    routing = randn(2, 3, gen=gen).softmax(-1)
    curvature = KroneckerCurvature(n_experts=3, d_out=4, d_in=6, rank=2)
    with torch.no_grad():
        curvature.Q.add_(0.1 * randn(*curvature.Q.shape, gen=gen))
    previous = base.expand(2, 4, 6)
    expected = camex_merge(base, task_vectors(base, experts), routing, curvature, 0.5)
    torch.testing.assert_close(
        ep_camex_merge(previous, experts, routing, curvature, 0.5), expected
    )


def test_ep_camex_refuses_a_previous_expert_of_another_shape(gen) -> None:
    curvature = KroneckerCurvature(n_experts=2, d_out=4, d_in=6)
    # the test run's shape checker (jaxtyping) or our own check, whichever is first
    with pytest.raises((MergeError, TypeCheckError), match="previous|d_out"):
        ep_camex_merge(
            torch.zeros(1, 6, 4), torch.zeros(2, 4, 6), torch.ones(1, 2), curvature
        )


def test_gradients_reach_every_identity_term_factor(gen) -> None:
    curvature = KroneckerCurvature(n_experts=2, d_out=4, d_in=6, rank=2)
    base, experts = randn(4, 6, gen=gen), randn(2, 4, 6, gen=gen)
    merged = camex_merge(
        base, task_vectors(base, experts), torch.tensor([0.4, 0.6]), curvature
    )
    (merged * randn(4, 6, gen=gen)).sum().backward()
    for factor in (curvature.P, curvature.Q, curvature.U, curvature.V):
        assert factor.grad is not None
        assert factor.grad[:, 0].abs().sum() > 0
    # the zero-initialised terms learn through Q first
    assert curvature.Q.grad[:, 1].abs().sum() > 0
