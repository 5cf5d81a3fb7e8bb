"""Tiny random Mixtral, OLMoE and Qwen2-MoE models for tests and doctests.

Built in memory from configs (no download) with the character-level tokenizer
of :mod:`controllens.testing`, seeded, two layers wide enough to route.
"""

import warnings
from typing import Any, Literal

import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from controllens.testing import tiny_config_kwargs, tiny_tokenizer

__all__ = ["MOE_ARCHITECTURES", "tiny_moe", "tiny_moe_bridge", "tiny_moe_nnsight"]

Architecture = Literal["mixtral", "olmoe", "qwen2_moe"]
#: The MoE families :func:`tiny_moe` builds.
MOE_ARCHITECTURES: tuple[str, ...] = ("mixtral", "olmoe", "qwen2_moe")


def tiny_moe(
    architecture: Architecture = "mixtral",
    *,
    n_experts: int = 4,
    top_k: int = 2,
    n_layers: int = 2,
    d_model: int = 32,
    seed: int = 0,
) -> PreTrainedModel:
    """A random MoE causal LM with the vocabulary of ``tiny_tokenizer``.

    Args:
        architecture: ``"mixtral"``, ``"olmoe"`` or ``"qwen2_moe"`` (the last
            has a gated shared expert beside the routed ones).
        n_experts: routed experts per layer.
        top_k: experts each token is routed to.
        n_layers: decoder layers (all of them MoE).
        d_model: residual width; experts are ``2 * d_model`` wide.
        seed: seed of the weights (the global generator is left as it was).

    Examples:
        >>> model = tiny_moe("olmoe", n_experts=3, top_k=1)
        >>> model.model.layers[0].mlp.experts.down_proj.shape
        torch.Size([3, 32, 64])
    """
    common = tiny_config_kwargs(n_layers=n_layers, d_model=d_model)
    common["num_experts_per_tok"] = top_k
    if architecture == "mixtral":
        config = MixtralConfig(num_local_experts=n_experts, **common)
        cls = MixtralForCausalLM
    elif architecture == "olmoe":
        config, cls = OlmoeConfig(num_experts=n_experts, **common), OlmoeForCausalLM
    elif architecture == "qwen2_moe":
        config = Qwen2MoeConfig(
            num_experts=n_experts,
            moe_intermediate_size=2 * d_model,
            shared_expert_intermediate_size=d_model,
            **common,
        )
        cls = Qwen2MoeForCausalLM
    else:
        raise ValueError(
            f"expected an architecture in {MOE_ARCHITECTURES}, got {architecture!r}"
        )
    config.architectures = [cls.__name__]
    config._name_or_path = f"tiny-{architecture}"
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(config)
        # OLMoE's router starts at zero; random rows make it route
        for layer in model.model.layers:
            layer.mlp.gate.weight.data.normal_(0.0, d_model**-0.5)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def tiny_moe_bridge(architecture: Architecture = "mixtral", **kwargs: Any) -> Any:
    """:func:`tiny_moe` booted as a TransformerLens ``TransformerBridge``.

    Examples:
        >>> "blocks.0.mlp.gate.hook_out" in tiny_moe_bridge().hook_dict
        True
    """
    from transformer_lens.model_bridge import TransformerBridge

    model = tiny_moe(architecture, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            model.config._name_or_path, hf_model=model, tokenizer=tiny_tokenizer()
        )


def tiny_moe_nnsight(architecture: Architecture = "mixtral", **kwargs: Any) -> Any:
    """:func:`tiny_moe` wrapped as an nnsight ``LanguageModel``.

    Examples:
        >>> model = tiny_moe_nnsight("olmoe", n_experts=3)
        >>> with model.trace("ab"):
        ...     logits, weights, indices = model.model.layers[0].mlp.gate.output
        ...     logits = logits.save()
        >>> logits.shape  # router logits, [tokens, expert]
        torch.Size([3, 3])
    """
    from controllens.models import load_nnsight

    return load_nnsight(tiny_moe(architecture, **kwargs), tokenizer=tiny_tokenizer())
