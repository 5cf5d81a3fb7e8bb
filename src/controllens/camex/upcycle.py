"""Dense model to merged-experts model, and export to the Mixtral format.

Upcycling (Komatsuzaki et al. 2023, as in CAMEx's experiments) copies a dense
MLP into every expert slot and into the base expert, optionally with noise, or
splits its neurons among the experts. The router starts at zero, so an
upcycled model computes exactly what the dense model computed until training
moves the experts apart.
"""

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

from controllens.adapters import decoder_layers
from controllens.camex.layers import ExpertChain, MergedExperts, MoEConfig, moe_layers
from controllens.errors import LayerError, MergeError, ModelError

__all__ = ["UpcycleConfig", "save_mixtral", "to_mixtral", "upcycle"]

logger = logging.getLogger(__name__)

_GATED = ("gate_proj", "up_proj", "down_proj")
_PLAIN = (("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"))


@dataclass(frozen=True, kw_only=True)
class UpcycleConfig:
    """Which layers to upcycle and how to fill their experts.

    Attributes:
        layers: decoder layer indices whose MLP becomes a merged-experts layer.
        moe: routing and merging settings shared by those layers.
        noise_std: Gaussian noise added to each expert copy, relative to the
            standard deviation of the weight it copies (0: exact copies).
        split: give each expert ``d_mlp / n_experts`` of the dense neurons
            instead of a full copy (down projections scaled by ``n_experts``,
            so the mixture of all experts at weight ``1 / n_experts`` is the
            dense MLP; the base is then the mean of the split experts).
        seed: seed of the noise (None: torch's global generator).

    Examples:
        >>> from controllens.testing import tiny_llama
        >>> config = UpcycleConfig(layers=(0, 2), moe=MoEConfig(n_experts=4),
        ...                        noise_std=0.01, seed=0)
        >>> model = upcycle(tiny_llama(), config)
        >>> [type(layer.mlp).__name__ for layer in model.model.layers]
        ['MergedExperts', 'LlamaMLP', 'MergedExperts']
        >>> model.model.layers[0].mlp.projections["gate"].experts.shape
        torch.Size([4, 64, 32])
    """

    layers: tuple[int, ...]
    moe: MoEConfig
    noise_std: float = 0.0
    split: bool = False
    seed: int | None = None


def _mlp_parts(mlp: nn.Module) -> tuple[bool, list[nn.Linear]]:
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _GATED):
        return True, [getattr(mlp, n) for n in _GATED]
    for names in _PLAIN:
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            return False, [getattr(mlp, n) for n in names]
    raise ModelError(
        f"expected a gated MLP ({', '.join(_GATED)}) or a plain MLP of two "
        f"nn.Linear ({', '.join('/'.join(p) for p in _PLAIN)}), got "
        f"{type(mlp).__name__} with children {[n for n, _ in mlp.named_children()]}; "
        "upcycling supports Llama-family and plain two-layer MLPs"
    )


def _activation(mlp: nn.Module) -> nn.Module:
    for name in ("act_fn", "act", "activation_fn", "activation"):
        act = getattr(mlp, name, None)
        if callable(act):
            return act
    raise ModelError(
        f"expected an activation attribute (act_fn, act, activation_fn) on "
        f"{type(mlp).__name__}, got none; wrap the MLP in a known layout"
    )


def _expert_weights(
    weights: list[torch.Tensor], config: UpcycleConfig, generator: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per projection: ``[expert, out, in]`` experts and the ``[out, in]`` base."""
    n = config.moe.n_experts
    experts, bases = [], []
    for index, weight in enumerate(weights):
        if config.split:
            # projections into d_mlp are split by rows, the last one by columns
            last = index == len(weights) - 1
            chunks = weight.chunk(n, dim=1 if last else 0)
            stacked = torch.stack([c * n if last else c for c in chunks])
        else:
            stacked = weight.expand(n, *weight.shape).clone()
        if config.noise_std > 0:
            noise = torch.randn(stacked.shape, generator=generator)
            stacked = stacked + config.noise_std * weight.std() * noise.to(weight)
        experts.append(stacked)
        bases.append(stacked.mean(0) if config.split else weight)
    return experts, bases


def upcycle(model: PreTrainedModel, config: UpcycleConfig) -> PreTrainedModel:
    """Replaces the MLPs of chosen layers by merged-experts layers, in place.

    Args:
        model: a Hugging Face causal LM with Llama-style gated MLPs (SmolLM2,
            Llama, Mistral, Qwen2) or plain two-layer MLPs.
        config: layers, MoE settings, and how to fill the experts.

    Returns:
        The same model object, upcycled.

    Raises:
        LayerError: a layer index outside the model.
        ModelError: an MLP layout this function does not know.
        MergeError: a neuron split that does not divide ``d_mlp``.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> torch.manual_seed(0) and None
        >>> tiny = LlamaForCausalLM(LlamaConfig(
        ...     vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> dense = tiny(ids).logits
        >>> moe = upcycle(tiny, UpcycleConfig(layers=(1,), moe=MoEConfig()))
        >>> torch.allclose(moe(ids).logits, dense, atol=1e-5)
        True
    """
    _, layers = decoder_layers(model)
    bad = [i for i in config.layers if not -len(layers) <= i < len(layers)]
    if bad or not config.layers:
        raise LayerError(
            f"expected layer indices in [0, {len(layers)}), got {list(config.layers)}"
        )
    generator = torch.Generator()
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()

    chain = ExpertChain() if config.moe.method == "ep_camex" else None
    ordered = sorted({i % len(layers) for i in config.layers})
    for position, index in enumerate(ordered):
        mlp = layers[index].mlp
        gated, linears = _mlp_parts(mlp)
        if config.split and linears[0].out_features % config.moe.n_experts:
            raise MergeError(
                f"expected n_experts={config.moe.n_experts} to divide d_mlp="
                f"{linears[0].out_features} for a neuron split; pick a divisor"
            )
        weights = [linear.weight.detach().float() for linear in linears]
        experts, bases = _expert_weights(weights, config, generator)
        has_bias = linears[0].bias is not None
        layer = MergedExperts(
            config.moe,
            d_model=linears[0].in_features,
            d_mlp=experts[0].shape[1],
            gated=gated,
            bias=has_bias,
            act_fn=_activation(mlp),
            has_base=config.moe.uses_base and (chain is None or position == 0),
            chain=chain,
        )
        with torch.no_grad():
            for projection, linear, stacked, base in zip(
                layer.projections.values(), linears, experts, bases, strict=True
            ):
                projection.experts.copy_(stacked)
                if projection.base is not None:
                    projection.base.copy_(base)
                if has_bias:
                    bias = linear.bias.detach().float()
                    projection.bias_experts.copy_(
                        bias.expand_as(projection.bias_experts)
                    )
                    if projection.bias_base is not None:
                        projection.bias_base.copy_(bias)
        layers[index].mlp = layer.to(linears[0].weight.device)
        logger.info("upcycled layer %d into %d experts", index, config.moe.n_experts)
    return model


def _effective_experts(layer: MergedExperts) -> list[torch.Tensor]:
    """Static experts ``W_0 + alpha T_i`` whose mixture is the merged weight."""
    if layer.config.method == "ep_camex":
        raise MergeError(
            "expected a static merge method for export, got 'ep_camex': its base "
            "is the previous layer's merged expert, which differs per input"
        )
    out = []
    with torch.no_grad():
        for projection in layer.projections.values():
            if projection.bias_experts is not None:
                raise ModelError("expected bias-free projections for Mixtral export")
            base, deltas, scale = projection.terms()
            out.append(deltas if base is None else base + scale * deltas)
    return out


def to_mixtral(model: PreTrainedModel) -> MixtralForCausalLM:
    """Converts an upcycled Llama-family model to a ``MixtralForCausalLM``.

    Upcycled layers keep their experts and router; dense layers become
    ``n_experts`` copies of their MLP behind a zero router (uniform routing,
    so they compute what they did). The result is exact for ``"mixture"``
    layers with per-token routing. Weight-merged layers are exported as the
    static experts ``W_0 + alpha M_i(tau_i)`` whose weighted sum is the merged
    weight; Mixtral mixes their outputs instead of their weights, which
    matches only for one-hot routing or agreeing experts, so a warning says so.

    Raises:
        ModelError: a model that is not Llama-family, or has no upcycled layer.
        MergeError: EP-CAMEx layers, or layers with different expert counts.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> tiny = LlamaForCausalLM(LlamaConfig(
        ...     vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> moe = upcycle(tiny, UpcycleConfig(layers=(0,), moe=MoEConfig(
        ...     n_experts=2, method="mixture", router="noisy_top_k", top_k=1)))
        >>> to_mixtral(moe).config.num_local_experts
        2
    """
    if getattr(model.config, "model_type", None) not in ("llama", "mistral"):
        raise ModelError(
            f"expected a Llama-family model (llama, mistral), got model_type "
            f"{getattr(model.config, 'model_type', None)!r}"
        )
    found = moe_layers(model)
    if not found:
        raise ModelError("expected an upcycled model, found no MergedExperts layer")
    counts = {layer.config.n_experts for _, layer in found}
    if len(counts) != 1:
        raise MergeError(f"expected one expert count in every layer, got {counts}")
    n_experts = counts.pop()
    first = found[0][1].config
    top_k = first.top_k if first.router == "noisy_top_k" else n_experts
    if any(
        layer.config.method != "mixture" or layer.config.granularity != "token"
        for _, layer in found
    ):
        warnings.warn(
            "Mixtral mixes expert outputs per token; the weight-merged or "
            "sequence/segment-routed layers are exported approximately",
            stacklevel=2,
        )

    # the config: Llama's, plus the MoE fields
    settings = model.config.to_dict()
    for key in ("model_type", "architectures", "mlp_bias", "pretraining_tp"):
        settings.pop(key, None)
    if settings.pop("attention_bias", False):
        raise ModelError("expected attention without biases for Mixtral export")
    widths = {p.experts.shape[1] for _, m in found for p in m.projections.values()}
    if model.config.intermediate_size not in widths:
        raise MergeError(
            "expected experts as wide as the dense MLPs, got a neuron split; "
            "Mixtral needs one expert width in every layer"
        )
    config = MixtralConfig(
        **settings,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    config.architectures = ["MixtralForCausalLM"]

    # the weights: every non-MLP tensor by name, the MLPs as expert stacks
    state = {
        k: v
        for k, v in model.state_dict().items()
        if ".mlp." not in k or not k.startswith("model.layers.")
    }
    _, layers = decoder_layers(model)
    for index, decoder in enumerate(layers):
        prefix = f"model.layers.{index}.mlp."
        if isinstance(decoder.mlp, MergedExperts):
            gate, up, down = _effective_experts(decoder.mlp)
            router = decoder.mlp.router.weight.detach()
        else:
            weights = [getattr(decoder.mlp, n).weight.detach() for n in _GATED]
            gate, up, down = (w.expand(n_experts, *w.shape) for w in weights)
            router = torch.zeros(n_experts, config.hidden_size)
        state[prefix + "gate.weight"] = router
        state[prefix + "experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[prefix + "experts.down_proj"] = down
    with torch.device("meta"):
        mixtral = MixtralForCausalLM(config)
    mixtral.load_state_dict(
        {k: v.contiguous().clone() for k, v in state.items()}, strict=False, assign=True
    )
    mixtral.tie_weights()
    missing = [n for n, p in mixtral.named_parameters() if p.is_meta]
    if missing:
        raise ModelError(
            f"expected every Mixtral weight to be filled, missing {missing}"
        )
    mixtral.model.rotary_emb = type(mixtral.model.rotary_emb)(config=config)
    return mixtral.eval()


def save_mixtral(
    model: PreTrainedModel, path: str | os.PathLike, tokenizer: object = None
) -> Path:
    """Saves an upcycled model as a Mixtral checkpoint (safetensors).

    The folder loads with ``AutoModelForCausalLM.from_pretrained``, and hence
    with a TransformerBridge or nnsight. See :func:`to_mixtral` for what is
    exact and what is approximated.

    Returns:
        The folder written.

    Examples:
        >>> import tempfile
        >>> from transformers import AutoModelForCausalLM
        >>> from controllens.testing import tiny_llama, tiny_tokenizer
        >>> moe = MoEConfig(n_experts=2, method="mixture", router="noisy_top_k",
        ...                 top_k=1)
        >>> model = upcycle(tiny_llama(), UpcycleConfig(layers=(1,), moe=moe))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_mixtral(model, tmp, tiny_tokenizer())
        ...     mixtral = AutoModelForCausalLM.from_pretrained(path)
        >>> type(mixtral).__name__, mixtral.config.num_local_experts
        ('MixtralForCausalLM', 2)
        >>> mixtral.model.layers[1].mlp.experts.down_proj.shape
        torch.Size([2, 32, 64])
    """
    path = Path(path)
    to_mixtral(model).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
