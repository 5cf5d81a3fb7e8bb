"""Tests of controllens.camex.upcycle."""

import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from controllens.camex.layers import MergedExperts, MoEConfig, moe_layers
from controllens.camex.upcycle import UpcycleConfig, save_mixtral, to_mixtral, upcycle
from controllens.errors import LayerError, MergeError, ModelError

METHODS = ["mixture", "smear", "task_vector", "ties", "dare", "camex", "ep_camex"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
def test_an_upcycled_model_computes_what_the_dense_model_did(ids, method) -> None:
    model = tiny_llama()
    with torch.no_grad():
        dense = model(ids).logits
    moe = MoEConfig(n_experts=3, method=method, granularity="segment", segment_length=4)
    upcycle(model, UpcycleConfig(layers=(0, 1), moe=moe))
    assert len(moe_layers(model)) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_ep_camex_layers_share_one_chain_and_only_the_first_has_a_base() -> None:
    model = upcycle(
        tiny_llama(),
        UpcycleConfig(layers=(0, 1), moe=MoEConfig(n_experts=2, method="ep_camex")),
    )
    (_, first), (_, second) = moe_layers(model)
    assert first.chain is second.chain
    assert first.projections["up"].base is not None
    assert second.projections["up"].base is None


def test_noise_makes_the_experts_differ_reproducibly() -> None:
    config = UpcycleConfig(
        layers=(1,), moe=MoEConfig(n_experts=2), noise_std=0.1, seed=3
    )
    a = moe_layers(upcycle(tiny_llama(), config))[0][1].projections["up"].experts
    b = moe_layers(upcycle(tiny_llama(), config))[0][1].projections["up"].experts
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])


def test_a_neuron_split_mixture_over_all_experts_is_the_dense_mlp(ids) -> None:
    model = tiny_llama()
    with torch.no_grad():
        dense = model(ids).logits
    moe = MoEConfig(n_experts=4, method="mixture")
    upcycle(model, UpcycleConfig(layers=(0,), moe=moe, split=True))
    layer = moe_layers(model)[0][1]
    assert layer.projections["gate"].experts.shape == (4, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_a_neuron_split_that_does_not_divide_the_width_is_refused() -> None:
    with pytest.raises(MergeError, match="divide d_mlp=64"):
        upcycle(
            tiny_llama(),
            UpcycleConfig(layers=(0,), moe=MoEConfig(n_experts=3), split=True),
        )


def test_layers_outside_the_model_are_refused() -> None:
    with pytest.raises(LayerError, match=r"layer indices in \[0, 2\)"):
        upcycle(tiny_llama(), UpcycleConfig(layers=(5,), moe=MoEConfig()))


def test_an_architecture_without_a_known_mlp_is_refused() -> None:
    model = tiny_llama()
    model.model.layers[0].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(ModelError, match="expected a gated MLP"):
        upcycle(model, UpcycleConfig(layers=(0,), moe=MoEConfig()))


def test_a_gpt2_style_plain_mlp_is_recognised_and_refused_with_its_conv1d() -> None:
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32)
    with pytest.raises(ModelError, match="plain MLP of two"):
        upcycle(GPT2LMHeadModel(config), UpcycleConfig(layers=(0,), moe=MoEConfig()))


def test_a_sparse_top_k_model_exports_exactly_to_mixtral(ids, tmp_path) -> None:
    model = tiny_llama()
    moe = MoEConfig(n_experts=4, method="mixture", router="noisy_top_k", top_k=2)
    upcycle(model, UpcycleConfig(layers=(1,), moe=moe, noise_std=0.2, seed=0))
    torch.nn.init.normal_(moe_layers(model)[0][1].router.weight)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    save_mixtral(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected)


def test_a_weight_merged_model_exports_with_a_warning(ids) -> None:
    model = upcycle(
        tiny_llama(), UpcycleConfig(layers=(0,), moe=MoEConfig(method="camex"))
    )
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.warns(UserWarning, match="exported approximately"):
        mixtral = to_mixtral(model)
    # identical experts: the output mixture equals the weight merge
    with torch.no_grad():
        torch.testing.assert_close(mixtral(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_ep_camex_and_non_llama_models_are_not_exported() -> None:
    model = upcycle(
        tiny_llama(),
        UpcycleConfig(layers=(0, 1), moe=MoEConfig(n_experts=2, method="ep_camex")),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MergeError, match="static merge method"):
            to_mixtral(model)
    with pytest.raises(ModelError, match="no MergedExperts"):
        to_mixtral(tiny_llama())


@pytest.mark.slow
def test_smollm2_upcycled_at_four_layers_keeps_its_logits() -> None:
    from controllens.models import load_hf

    torch.set_num_threads(2)
    model, tokenizer = load_hf()
    model.eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model(ids).logits
    moe = MoEConfig(
        n_experts=4, method="camex", granularity="segment", segment_length=4
    )
    upcycle(model, UpcycleConfig(layers=(26, 27, 28, 29), moe=moe))
    assert all(isinstance(model.model.layers[i].mlp, MergedExperts) for i in (26, 29))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-4, atol=1e-3)
