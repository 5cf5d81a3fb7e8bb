"""Tests of controllens.camex.layers."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from controllens.camex.layers import (
    ExpertChain,
    MergedExperts,
    MoEConfig,
    choose_path,
    collect_aux_losses,
)
from controllens.errors import MergeError

D_MODEL, D_MLP = 16, 32
METHODS = ["smear", "task_vector", "ties", "dare", "camex", "ep_camex", "mixture"]


@pytest.fixture(scope="module")
def dense() -> LlamaMLP:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=D_MODEL, intermediate_size=D_MLP, num_attention_heads=2
    )
    return LlamaMLP(config).eval()


def copy_dense(layer: MergedExperts, mlp: LlamaMLP, noise: float = 0.0) -> None:
    """Puts the dense MLP in every expert slot (and the base)."""
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            weight = getattr(mlp, f"{name}_proj").weight
            projection = layer.projections[name]
            projection.experts.copy_(weight.expand_as(projection.experts))
            projection.experts.add_(noise * torch.randn_like(projection.experts))
            if projection.base is not None:
                projection.base.copy_(weight)


def hidden(batch: int = 2, pos: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        batch, pos, D_MODEL, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", ["token", "sequence", "segment"])
def test_uniform_routing_over_identical_experts_reproduces_the_dense_mlp(
    dense, method, granularity
) -> None:
    config = MoEConfig(
        n_experts=4,
        method=method,
        granularity=granularity,
        segment_length=3,
        dare_drop=0.5,
    )
    layer = MergedExperts(config, d_model=D_MODEL, d_mlp=D_MLP)
    copy_dense(layer, dense)
    layer.train(method == "dare")
    x = hidden()
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", ["token", "sequence", "segment"])
@pytest.mark.parametrize("method", ["smear", "ties", "camex"])
def test_the_weights_and_outputs_paths_agree(dense, method, granularity) -> None:
    outputs = {}
    for path in ("weights", "outputs"):
        torch.manual_seed(3)
        config = MoEConfig(
            n_experts=3,
            method=method,
            granularity=granularity,
            segment_length=2,
            path=path,
        )
        layer = MergedExperts(config, d_model=D_MODEL, d_mlp=D_MLP)
        torch.nn.init.normal_(layer.router.weight)
        outputs[path] = layer(hidden())
    torch.testing.assert_close(outputs["weights"], outputs["outputs"])


def test_the_cheaper_path_follows_the_routing_granularity() -> None:
    shapes = {"n_experts": 4, "d_out": 1536, "d_in": 576}
    assert choose_path(n_groups=8, n_tokens=8 * 256, **shapes) == "weights"
    assert choose_path(n_groups=2048, n_tokens=2048, **shapes) == "outputs"


def test_gradients_reach_the_curvature_factors_and_the_router() -> None:
    torch.manual_seed(0)
    layer = MergedExperts(
        MoEConfig(n_experts=3, method="camex", curvature_rank=2),
        d_model=D_MODEL,
        d_mlp=D_MLP,
    )
    layer(hidden()).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for projection in layer.projections.values():
        curvature = projection.curvature
        for factor in (curvature.P, curvature.Q, curvature.U, curvature.V):
            assert factor.grad[:, 0].abs().sum() > 0
        assert curvature.Q.grad[:, 1].abs().sum() > 0


@pytest.mark.parametrize("method", ["smear", "camex", "ep_camex", "mixture"])
def test_one_training_step_lowers_the_loss_on_a_fixed_batch(method) -> None:
    torch.manual_seed(0)
    config = MoEConfig(n_experts=3, method=method, router="noisy_top_k", top_k=2)
    layer = MergedExperts(config, d_model=D_MODEL, d_mlp=D_MLP).eval()
    # a router away from its all-equal start, so top-k has no ties to flip
    torch.nn.init.normal_(layer.router.weight)
    x, target = hidden(), hidden(seed=2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return (layer(x) - target).pow(2).mean()

    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


def test_segment_routing_never_reads_later_segments() -> None:
    torch.manual_seed(0)
    config = MoEConfig(
        n_experts=3, method="camex", granularity="segment", segment_length=3
    )
    layer = MergedExperts(config, d_model=D_MODEL, d_mlp=D_MLP)
    torch.nn.init.normal_(layer.router.weight)
    x = hidden(batch=1, pos=9)
    changed = x.clone()
    changed[:, 6:] += 1.0
    torch.testing.assert_close(layer(x)[:, :6], layer(changed)[:, :6])
    assert not torch.allclose(layer(x)[:, 6:], layer(changed)[:, 6:])


def test_segments_use_the_previous_segments_routing_weights() -> None:
    torch.manual_seed(0)
    config = MoEConfig(
        n_experts=3, method="smear", granularity="segment", segment_length=2
    )
    layer = MergedExperts(config, d_model=D_MODEL, d_mlp=D_MLP)
    torch.nn.init.normal_(layer.router.weight)
    seen = {}
    layer.hook_router_logits.add_hook(lambda t, hook: seen.setdefault("logits", t))
    layer.hook_routing_weights.add_hook(lambda t, hook: seen.setdefault("w", t))
    layer(hidden(batch=1, pos=5))
    own = seen["logits"].softmax(-1)
    assert seen["w"].shape == (1, 3, 3)
    torch.testing.assert_close(seen["w"][:, 1:], own[:, :-1])
    torch.testing.assert_close(seen["w"][:, 0], own[:, 0])
    assert not seen["w"][:, 0].requires_grad or seen["w"].grad_fn is not None


def test_a_hook_forcing_one_hot_routing_selects_that_expert(dense) -> None:
    layer = MergedExperts(
        MoEConfig(n_experts=3, method="smear"), d_model=D_MODEL, d_mlp=D_MLP
    )
    copy_dense(layer, dense, noise=0.5)

    def one_hot(weights: torch.Tensor, hook) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full(weights.shape[:-1], 2), 3).to(
            weights.dtype
        )

    layer.hook_routing_weights.add_hook(one_hot)
    x = hidden()
    gate, up, down = (layer.projections[n].experts[2] for n in ("gate", "up", "down"))
    expected = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(layer(x), expected)
    layer.hook_routing_weights.remove_hooks()


def test_noisy_top_k_routing_keeps_k_experts_and_reports_a_balancing_loss() -> None:
    torch.manual_seed(0)
    config = MoEConfig(n_experts=4, method="mixture", router="noisy_top_k", top_k=2)
    layer = MergedExperts(config, d_model=D_MODEL, d_mlp=D_MLP)
    torch.nn.init.normal_(layer.router.weight)
    seen = {}
    layer.hook_routing_weights.add_hook(lambda t, hook: seen.setdefault("w", t))
    with collect_aux_losses(layer) as losses:
        layer(hidden())
    assert ((seen["w"] > 0).sum(-1) == 2).all()
    assert len(losses) == 1 and losses[0].item() >= 1.0 - 1e-6
    losses[0].backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_a_chained_ep_camex_layer_merges_on_the_previous_layers_expert(dense) -> None:
    config = MoEConfig(n_experts=2, method="ep_camex")
    chain = ExpertChain()
    first = MergedExperts(config, d_model=D_MODEL, d_mlp=D_MLP, chain=chain)
    second = MergedExperts(
        config, d_model=D_MODEL, d_mlp=D_MLP, has_base=False, chain=chain
    )
    assert second.projections["gate"].base is None
    copy_dense(first, dense)
    copy_dense(second, dense)
    x = hidden()
    torch.testing.assert_close(second(first(x)), dense(dense(x)), rtol=1e-5, atol=1e-6)

    lone = MergedExperts(
        config, d_model=D_MODEL, d_mlp=D_MLP, has_base=False, chain=ExpertChain()
    )
    with pytest.raises(MergeError, match="first layer of the EP-CAMEx chain"):
        lone(x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_experts": 2, "top_k": 3}, "top_k between 1 and n_experts=2"),
        ({"router": "noisy_top_k"}, "expected top_k"),
        ({"granularity": "segment"}, "segment_length"),
        ({"n_experts": 0}, "n_experts >= 1"),
    ],
    ids=["top-k-above-n", "top-k-missing", "segment-length-missing", "no-experts"],
)
def test_bad_configs_are_refused(kwargs, match) -> None:
    with pytest.raises(MergeError, match=match):
        MoEConfig(**kwargs)


def test_a_width_the_kronecker_factor_does_not_divide_is_refused() -> None:
    with pytest.raises(MergeError, match="divides the width 32"):
        MergedExperts(
            MoEConfig(method="camex", out_factor=5), d_model=D_MODEL, d_mlp=D_MLP
        )


def test_a_plain_mlp_with_biases_merges_too() -> None:
    torch.manual_seed(0)
    layer = MergedExperts(
        MoEConfig(n_experts=2, method="camex"),
        d_model=D_MODEL,
        d_mlp=D_MLP,
        gated=False,
        bias=True,
        act_fn=torch.nn.GELU(),
    )
    assert set(layer.projections) == {"fc_in", "fc_out"}
    out = layer(hidden())
    out.sum().backward()
    assert layer.projections["fc_in"].bias_experts.grad is not None
