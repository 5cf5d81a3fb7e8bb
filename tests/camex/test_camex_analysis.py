"""Tests of merge analysis on hooked MoE models (controllens.camex.analysis etc.)."""

import gc
import warnings
import weakref

import pytest
import torch

from controllens.camex.analysis import (
    RoutingHooks,
    calibration_batches,
    find_moe_layers,
    token_windows,
)
from controllens.camex.curvature import estimate_curvature
from controllens.camex.probes import (
    PROBE_METHODS,
    merge_group,
    merge_plan,
    merge_probe,
)
from controllens.camex.routing import routing_stats
from controllens.camex.similarity import expert_similarity
from controllens.camex.tiny import (
    MOE_ARCHITECTURES,
    tiny_moe,
    tiny_moe_bridge,
    tiny_moe_nnsight,
)
from controllens.errors import (
    DataError,
    HookPointError,
    LayerError,
    MergeError,
    ModelError,
)
from controllens.models import load_bridge, load_nnsight
from controllens.testing import tiny_llama, tiny_tokenizer

TEXTS = [
    "the cat sat on the mat",
    "hello world, how are you today?",
    "abc",
    "To be, or not to be: that is the question.",
]
HELD_OUT = ["a quick brown fox jumps", "over the lazy dog again"]


def identical_experts(architecture: str, top_k: int = 2):
    """A tiny MoE model whose experts are copies of expert 0 in every layer."""
    model = tiny_moe(architecture, top_k=top_k)
    for layer in find_moe_layers(model):
        experts = layer.experts
        with torch.no_grad():
            experts.gate_up_proj.copy_(
                experts.gate_up_proj[:1].expand_as(experts.gate_up_proj)
            )
            experts.down_proj.copy_(experts.down_proj[:1].expand_as(experts.down_proj))
    return model


@pytest.fixture(scope="module", params=MOE_ARCHITECTURES)
def pair(request):
    """The same seeded MoE model as a TransformerBridge and as nnsight."""
    return tiny_moe_bridge(request.param), tiny_moe_nnsight(request.param)


def test_transformer_lens_and_nnsight_give_the_same_routing_statistics(pair):
    bridge, nnsight = pair
    a = routing_stats(bridge, TEXTS, batch_size=3)
    b = routing_stats(nnsight, TEXTS, batch_size=3)
    assert a.layers == b.layers == (0, 1)
    assert a.n_tokens == b.n_tokens == sum(len(t) for t in TEXTS)
    torch.testing.assert_close(a.counts, b.counts, rtol=0, atol=0)
    torch.testing.assert_close(a.co_selection, b.co_selection, rtol=0, atol=0)
    torch.testing.assert_close(a.weight_sums, b.weight_sums)
    torch.testing.assert_close(a.entropy, b.entropy)
    assert a.top_tokens == b.top_tokens


def test_routing_statistics_are_consistent_tallies(pair):
    stats = routing_stats(pair[0], TEXTS, batch_size=2, n_examples=3)
    torch.testing.assert_close(stats.load.sum(-1), torch.ones(2))
    torch.testing.assert_close(
        stats.co_selection.diagonal(dim1=1, dim2=2), stats.counts
    )
    assert (stats.counts.sum(-1) == stats.n_tokens * stats.top_k).all()
    assert (stats.entropy > 0).all() and (stats.normalized_entropy <= 1).all()
    assert (stats.load_cv >= 0).all()
    expert_tokens = stats.top_tokens[0]
    assert len(expert_tokens) == 4 and all(len(e) <= 3 for e in expert_tokens)
    assert sum(n for e in expert_tokens for _, n in e) > 0
    assert stats.to_dict()["layers"] == [0, 1]


def test_routing_streams_batches_without_keeping_them():
    bridge = tiny_moe_bridge()
    tokenizer = tiny_tokenizer()
    alive: list[weakref.ref] = []
    most_alive = 0

    def batches():
        nonlocal most_alive
        for _ in range(6):
            gc.collect()
            most_alive = max(most_alive, sum(r() is not None for r in alive))
            tokens = torch.tensor(
                tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
            ).repeat(2, 1)
            alive.append(weakref.ref(tokens))
            yield tokens

    stats = routing_stats(bridge, batches())
    assert stats.n_tokens == 6 * 2 * len(TEXTS[1])
    # at most the batch being replaced is still referenced
    assert most_alive <= 1


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
@pytest.mark.parametrize("method", ["flat", "fisher", "kfac"])
def test_a_top1_merge_probe_reproduces_a_top1_model_exactly(architecture, method):
    model = tiny_moe_bridge(architecture, top_k=1)
    curvature = estimate_curvature(model, TEXTS[:2])
    report = merge_probe(
        model, HELD_OUT, methods=method, curvature=curvature, together=True
    )
    for cost in [*report.per_layer[method].values(), report.together[method]]:
        assert cost.kl < 1e-10
        assert abs(cost.delta_loss) < 1e-6


def test_a_probe_keeping_only_the_top1_expert_changes_a_top2_model():
    report = merge_probe(tiny_moe_bridge(), HELD_OUT, top_k=1)
    assert all(cost.kl > 1e-6 for cost in report.per_layer["flat"].values())


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_merging_identical_experts_costs_zero_kl(architecture):
    model = load_nnsight(identical_experts(architecture), tokenizer=tiny_tokenizer())
    curvature = estimate_curvature(model, TEXTS[:2])
    report = merge_probe(
        model, HELD_OUT, methods=PROBE_METHODS, curvature=curvature, together=True
    )
    for method in PROBE_METHODS:
        assert report.together[method].kl < 1e-10, method
    for method in ("flat", "fisher", "kfac"):
        cost = merge_group(
            model,
            HELD_OUT,
            layer=1,
            experts=(0, 2, 3),
            method=method,
            curvature=curvature,
        )
        assert cost.kl < 1e-10 and cost.delta_loss == pytest.approx(0, abs=1e-9)


def test_merging_a_group_changes_the_model_only_while_measured():
    bridge = tiny_moe_bridge()
    before = [w.clone() for w in find_moe_layers(bridge, 0)[0].projections()]
    cost = merge_group(bridge, HELD_OUT, layer=0, experts=(1, 2))
    assert cost.kl > 0
    after = find_moe_layers(bridge, 0)[0].projections()
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_expert_similarity_finds_a_copied_expert():
    model = tiny_moe("olmoe")
    layer = find_moe_layers(model, 1)[0]
    with torch.no_grad():
        for weight in (layer.experts.gate_up_proj, layer.experts.down_proj):
            weight[3] = weight[1]
    sim = expert_similarity(model, TEXTS, tokenizer=tiny_tokenizer())
    assert sim.most_similar(1) == (1, 3) == sim.most_similar(1, by="weights")
    assert sim.output_cka[1, 1, 3] == pytest.approx(1.0, abs=1e-5)
    assert sim.weight_cosine[1, 1, 3] == pytest.approx(1.0, abs=1e-5)
    assert sim.output_cka[0].diagonal() == pytest.approx(torch.ones(4), abs=1e-5)
    assert sim.n_tokens == sum(len(t) for t in TEXTS)


def test_expert_similarity_without_data_gives_weights_only():
    sim = expert_similarity(tiny_moe())
    assert sim.output_cka is None and sim.weight_cosine.shape == (2, 4, 4)


def test_curvature_is_an_average_over_routed_tokens():
    curvature = estimate_curvature(tiny_moe_bridge(), TEXTS, kfac=True)
    c = curvature[1]
    assert c.usage.sum() == pytest.approx(1.0)
    assert all((f >= 0).all() for f in c.fisher)
    for factor in (*c.kfac_in, *c.kfac_out):
        torch.testing.assert_close(factor, factor.transpose(1, 2))


def test_a_merge_plan_partitions_the_experts_within_budget():
    bridge = tiny_moe_bridge()
    curvature = estimate_curvature(bridge, TEXTS, kfac=False)
    plan = merge_plan(bridge, HELD_OUT, curvature, budget=2)
    for layer, groups in plan.groups.items():
        assert len(groups) == 2
        assert sorted(e for g in groups for e in g) == [0, 1, 2, 3]
        assert plan.predicted[layer] > 0 and plan.measured[layer].kl > 0
    assert plan.together is not None and plan.together.kl > 0
    full = merge_plan(bridge, HELD_OUT, curvature, budget=4)
    assert all(full.measured[layer].kl == 0 for layer in (0, 1))


def test_a_model_without_moe_layers_gets_an_error_naming_what_it_has():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = load_bridge(tiny_llama(), tokenizer=tiny_tokenizer())
    with pytest.raises(ModelError, match="no MoE block.*layer 0 has"):
        routing_stats(bridge, TEXTS)


def test_a_layer_out_of_range_gets_an_error_naming_the_moe_layers():
    with pytest.raises(LayerError, match=r"has 2 layers and MoE layers \(0, 1\)"):
        routing_stats(tiny_moe_bridge(), TEXTS, layers=5)
    with pytest.raises(TypeError):
        find_moe_layers(tiny_moe(), [0.5])


def test_a_missing_hook_gets_an_error_listing_the_hook_points(pair):
    bridge, nnsight = pair
    hooks = RoutingHooks(logits="blocks.{layer}.mlp.router.hook_out")
    with pytest.raises(HookPointError, match=r"mlp\.router.*blocks\.0\.mlp\.gate"):
        routing_stats(bridge, TEXTS, hooks=hooks)
    with pytest.raises(HookPointError, match="router module at"):
        routing_stats(nnsight, TEXTS, hooks=RoutingHooks(router="mlp.router"))


def test_curvature_methods_without_curvature_get_a_clear_error():
    with pytest.raises(MergeError, match="estimate_curvature"):
        merge_probe(tiny_moe_bridge(), HELD_OUT, methods="fisher")
    with pytest.raises(MergeError, match="kfac=True"):
        bridge = tiny_moe_bridge()
        curvature = estimate_curvature(bridge, TEXTS[:1], kfac=False)
        merge_probe(bridge, HELD_OUT, methods="kfac", curvature=curvature)
    with pytest.raises(MergeError, match="disjoint"):
        merge_group(tiny_moe_bridge(), HELD_OUT, layer=0, experts=(0, 9))


def test_calibration_data_in_every_form_gives_the_same_batches():
    tokenizer = tiny_tokenizer()
    windows = token_windows(" ".join(TEXTS), tokenizer, seq_len=8)
    from_tensor = list(calibration_batches(windows, batch_size=3))
    from_iterable = list(calibration_batches(iter(windows.split(3))))
    assert len(from_tensor) == len(from_iterable) == -(-len(windows) // 3)
    for (a, ma), (b, mb) in zip(from_tensor, from_iterable, strict=True):
        assert torch.equal(a, b) and bool(ma.all()) and bool(mb.all())
    with pytest.raises(DataError, match="tokenizer"):
        list(calibration_batches(["x"]))
    with pytest.raises(DataError, match="at least 50 tokens"):
        token_windows("short", tokenizer, seq_len=50)


@pytest.mark.slow
def test_an_upcycled_smollm2_exported_as_mixtral_can_be_probed(tmp_path):
    from controllens.camex.layers import MoEConfig
    from controllens.camex.upcycle import UpcycleConfig, save_mixtral, upcycle
    from controllens.models import load_hf

    torch.manual_seed(0)
    model, tokenizer = load_hf()
    moe = MoEConfig(n_experts=2, method="mixture", router="noisy_top_k", top_k=1)
    upcycle(model, UpcycleConfig(layers=(29,), moe=moe, noise_std=0.02, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_mixtral(model, tmp_path / "moe", tokenizer)
    del model
    bridge = load_bridge(path)
    stats = routing_stats(bridge, HELD_OUT, layers=29)
    assert stats.n_tokens > 0
    report = merge_probe(bridge, HELD_OUT, layers=29)
    # one expert per token with weight 1: a top-1 flat probe is exact
    assert report.per_layer["flat"][29].kl < 1e-8
