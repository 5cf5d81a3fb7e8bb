"""What controllens needs to know about a model, whatever wraps it.

Three kinds of model are accepted everywhere: a TransformerLens model (a 4.x
``TransformerBridge`` or a 3.x ``HookedTransformer``; both speak the hook
protocol ``fn(activation, hook) -> activation``), an nnsight ``LanguageModel``,
and a plain Hugging Face causal LM.
"""

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from controllens.errors import HookPointError, LayerError, ModelError

__all__ = [
    "HOOK_POINTS",
    "ModelInfo",
    "decoder_layers",
    "inspect_model",
    "layer_index",
    "resolve_layers",
    "tl_hook_name",
]

HookPoint = Literal["resid_post", "resid_pre"]
#: Where a steering vector is read and written, in TransformerLens words.
HOOK_POINTS: tuple[str, ...] = ("resid_post", "resid_pre")

Kind = Literal["transformer_lens", "nnsight", "hf"]

# attribute paths of the decoder-layer list in common HF causal LMs
_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A model's kind and the sizes steering depends on.

    Examples:
        >>> from controllens.testing import tiny_nnsight
        >>> info = inspect_model(tiny_nnsight())
        >>> info.kind, info.name, info.n_layers, info.d_model, info.layers_path
        ('nnsight', 'tiny-llama', 3, 32, 'model.layers')
    """

    kind: Kind
    name: str
    n_layers: int
    d_model: int
    tokenizer: Any
    #: the underlying HF module (None for a TransformerLens 3.x model)
    hf_model: nn.Module | None
    #: attribute path of the decoder layers inside ``hf_model``, e.g. "model.layers"
    layers_path: str | None
    device: torch.device
    dtype: torch.dtype


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(hf_model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the list of decoder layers of a Hugging Face causal LM.

    Returns:
        The attribute path (for example ``"model.layers"``) and the module list.

    Examples:
        >>> from controllens.testing import tiny_llama
        >>> path, layers = decoder_layers(tiny_llama())
        >>> path, len(layers)
        ('model.layers', 3)
    """
    for path in _LAYER_PATHS:
        try:
            layers = _get_path(hf_model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise ModelError(
        f"Could not find the decoder layers of {type(hf_model).__name__}: looked "
        f"for {', '.join(_LAYER_PATHS)}. controllens supports decoder-only causal "
        "LMs in these layouts (Llama, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX)."
    )


def _short_name(name: str | None) -> str:
    return Path(str(name)).name if name else "unknown"


def inspect_model(model: Any) -> ModelInfo:
    """Recognise a model and read its sizes.

    Args:
        model: A TransformerBridge, HookedTransformer, nnsight LanguageModel or
            Hugging Face causal LM.

    Returns:
        Its :class:`ModelInfo`.

    Examples:
        >>> from controllens.testing import tiny_bridge, tiny_llama
        >>> info = inspect_model(tiny_bridge())
        >>> info.kind, info.n_layers, info.d_model, info.dtype
        ('transformer_lens', 3, 32, torch.float32)
        >>> inspect_model(tiny_llama()).kind
        'hf'
    """
    if not callable(getattr(model, "parameters", None)):
        raise ModelError(
            f"Expected a TransformerBridge, HookedTransformer, nnsight "
            f"LanguageModel or Hugging Face causal LM, got {type(model).__name__} "
            f"({model!r:.60}). Load one with controllens.load_bridge(), "
            "load_nnsight() or load_hf()."
        )
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32

    if hasattr(model, "run_with_hooks") and hasattr(model, "cfg"):
        cfg = model.cfg
        hf_model = getattr(model, "original_model", None)
        layers_path = decoder_layers(hf_model)[0] if hf_model is not None else None
        return ModelInfo(
            kind="transformer_lens",
            name=_short_name(cfg.model_name),
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            tokenizer=model.tokenizer,
            hf_model=hf_model,
            layers_path=layers_path,
            device=device,
            dtype=dtype,
        )

    hf_model, kind = model, "hf"
    wrapped = getattr(model, "_module", None)
    if hasattr(model, "trace") and isinstance(wrapped, nn.Module):
        hf_model, kind = wrapped, "nnsight"
    if not hasattr(hf_model, "config"):
        raise ModelError(
            f"Expected a TransformerBridge, HookedTransformer, nnsight "
            f"LanguageModel or Hugging Face causal LM, got {type(model).__name__}."
        )
    layers_path, layers = decoder_layers(hf_model)
    config = hf_model.config
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return ModelInfo(
        kind=kind,
        name=_short_name(getattr(config, "_name_or_path", None)),
        n_layers=len(layers),
        d_model=int(d_model),
        tokenizer=getattr(model, "tokenizer", None),
        hf_model=hf_model,
        layers_path=layers_path,
        device=device,
        dtype=dtype,
    )


def resolve_layers(
    layers: int | Iterable[int] | None, n_layers: int
) -> tuple[int, ...]:
    """Normalise layer indices: negatives count from the end; sorted, unique.

    Args:
        layers: One index, several, or None for every layer.
        n_layers: Number of layers of the model.

    Returns:
        The indices in layer order (the order the forward pass visits them).

    Examples:
        >>> resolve_layers([5, -1, 2], n_layers=8)
        (2, 5, 7)
    """
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, numbers.Integral):
        layers = [layers]
    resolved = {layer_index(layer, n_layers) for layer in layers}
    if not resolved:
        raise LayerError("Expected at least one layer, got an empty list.")
    return tuple(sorted(resolved))


def layer_index(layer: int, n_layers: int | None) -> int:
    """Check one layer index and make it non-negative.

    Args:
        layer: The index; negative counts from the end.
        n_layers: Number of layers of the model; None when unknown, in which
            case negative indices are refused.

    Examples:
        >>> layer_index(-1, n_layers=8), layer_index(3, n_layers=None)
        (7, 3)
    """
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(
            f"Layer indices must be integers, got {layer!r} ({type(layer).__name__})."
        )
    layer = int(layer)
    if n_layers is None:
        if layer < 0:
            raise LayerError(
                f"Negative layer index {layer} needs the model's layer count to "
                "resolve it; pass n_layers=model's layer count."
            )
        return layer
    if not -n_layers <= layer < n_layers:
        raise LayerError(
            f"Layer {layer} is outside the model, which has {n_layers} layers: "
            f"use 0..{n_layers - 1}, or -{n_layers}..-1 to count from the end."
        )
    return layer % n_layers


def check_hook_point(hook_point: str) -> None:
    """Raise :class:`HookPointError` unless ``hook_point`` is supported."""
    if hook_point not in HOOK_POINTS:
        raise HookPointError(
            f"Unknown hook point {hook_point!r}; valid choices: "
            f"{', '.join(HOOK_POINTS)}."
        )


def tl_hook_name(hook_point: str, layer: int) -> str:
    """TransformerLens hook name of a hook point at a layer.

    Examples:
        >>> tl_hook_name("resid_post", 3)
        'blocks.3.hook_resid_post'
    """
    check_hook_point(hook_point)
    return f"blocks.{layer}.hook_{hook_point}"
