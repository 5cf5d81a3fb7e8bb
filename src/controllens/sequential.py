"""Sequential (closed-loop) estimation of the error signal r(k).

Non-sequential estimation measures every r(k) on clean activations. Sequential
estimation, as in Mean-AcT and the paper's PID-AcT, measures r(k) on source
activations already steered at the earlier layers:

    r(k) = mu_target(k) - mean_x[ h_k(x; u(k0), ..., u(k-1)) ]

so each layer corrects what the earlier pushes left over. The reference code
runs one forward pass over the data per steered layer. :func:`sequential_steering`
instead sweeps the data through the model one layer at a time, holding every
text's hidden state between layers: one forward's worth of compute in all, at
the price of keeping the source activations of one layer in memory.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from controllens.adapters import (
    check_hook_point,
    decoder_layers,
    inspect_model,
    resolve_layers,
)
from controllens.controllers import Gains, LayerController
from controllens.data import ContrastiveTexts
from controllens.errors import ModelError
from controllens.steering import Positions, Steering
from controllens.tokens import encode, pad, resolve_tokenizer, token_weights
from controllens.vectors import _check_options, _coerce_data, _hf_forward, _side_means

__all__ = ["sequential_steering"]

logger = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised from the first layer's pre-hook once its inputs are captured."""


@dataclass
class _Batch:
    hidden: Tensor
    layer_kwargs: dict[str, Any]
    weights: Tensor
    mask: Tensor


def sequential_steering(
    model: Any,
    data: ContrastiveTexts | None = None,
    *,
    target: Sequence[str] | None = None,
    source: Sequence[str] | None = None,
    tokenizer: Any = None,
    layers: int | Sequence[int] | None = None,
    gains: Gains | None = None,
    alpha: float = 1.0,
    positions: Positions = "all",
    hook_point: str = "resid_post",
    aggregation: str = "mean",
    batch_size: int = 16,
    chat_template: bool = False,
    max_length: int | None = None,
    method: Literal["sweep", "per_layer"] = "sweep",
    progress: bool = True,
) -> Steering:
    """Estimate r(k) sequentially and return the steering that uses it.

    During estimation every real token of the source texts is steered with
    ``alpha * u(j)`` at each earlier steered layer j, where u is the PID
    signal of the errors measured so far; the returned :class:`Steering`
    recomputes exactly that signal from its errors.

    Args:
        model: A TransformerBridge, nnsight LanguageModel or HF causal LM.
        data: Target and source texts (or pass ``target`` and ``source``).
        target: Texts of the behaviour to steer towards (measured clean).
        source: Texts of the behaviour to steer away from (measured steered).
        tokenizer: Needed only for a plain HF model.
        layers: Layers to steer; None for all.
        gains: Controller gains; default P with Kp = 1.
        alpha: Strength used during estimation and kept in the result.
        positions: Token positions of the returned steering (estimation
            steers every real token).
        hook_point: ``"resid_post"`` or ``"resid_pre"``.
        aggregation: ``"mean"`` (real tokens but the first) or ``"last"``.
        batch_size: Texts per batch.
        chat_template: Wrap texts in the tokenizer's chat template.
        max_length: Truncate texts to this many tokens.
        method: ``"sweep"`` (one layer-by-layer pass over the data) or
            ``"per_layer"`` (one full forward pass per steered layer, the
            reference approach; slower, for checking and benchmarks).
        progress: Show a progress bar.

    Returns:
        A :class:`Steering` whose errors are the sequential r(k).

    Examples:
        >>> from controllens.testing import tiny_llama, tiny_tokenizer
        >>> steering = sequential_steering(
        ...     tiny_llama(), target=["so good", "lovely"], source=["bad", "awful"],
        ...     tokenizer=tiny_tokenizer(), gains=Gains.pi(), progress=False)
        >>> steering.layers, tuple(steering.errors.shape)
        ((0, 1, 2), (3, 32))
    """
    data = _coerce_data(data, target, source)
    check_hook_point(hook_point)
    _check_options(aggregation, batch_size, "right", max_length)
    if method not in ("sweep", "per_layer"):
        raise ValueError(
            f"Unknown method {method!r}; valid choices: 'sweep', 'per_layer'."
        )
    gains = Gains() if gains is None else gains
    info = inspect_model(model)
    if info.hf_model is None:
        raise ModelError(
            "Sequential estimation runs the decoder layers of the underlying "
            "Hugging Face model; this model has none (a TransformerLens 3.x "
            "HookedTransformer?). Use a TransformerBridge, nnsight or HF model."
        )
    tokenizer, bos = resolve_tokenizer(info, tokenizer, chat_template, None)
    chosen = resolve_layers(layers, info.n_layers)
    options = {
        "tokenizer": tokenizer,
        "bos": bos,
        "aggregation": aggregation,
        "batch_size": batch_size,
        "chat_template": chat_template,
        "max_length": max_length,
    }

    bar = tqdm(
        total=len(data.target)
        + len(data.source) * (1 if method == "sweep" else len(chosen)),
        desc=f"sequential r(k), {method}",
        disable=not progress,
        unit="text",
    )
    with torch.inference_mode(), bar:
        target_means = _side_means(
            data.target,
            "target",
            _hf_forward(info.hf_model, chosen, hook_point),
            layers=chosen,
            d_model=info.d_model,
            padding_side="right",
            device=info.device,
            bar=bar,
            **options,
        )
        run = _sweep if method == "sweep" else _per_layer
        errors = run(
            info.hf_model,
            data.source,
            target_means,
            layers=chosen,
            gains=gains,
            alpha=alpha,
            hook_point=hook_point,
            d_model=info.d_model,
            device=info.device,
            bar=bar,
            **options,
        )

    return Steering(
        errors=errors.to(torch.float32).cpu(),
        layers=chosen,
        gains=gains,
        alpha=alpha,
        positions=positions,
        hook_point=hook_point,
        model_name=info.name,
        n_layers=info.n_layers,
    )


def _check_uniform_layers(hf_model: nn.Module, deepest: int) -> None:
    types = getattr(hf_model.config, "layer_types", None)
    if types and len(set(types[: deepest + 1])) > 1:
        raise ModelError(
            f"The layer-by-layer sweep reuses one attention mask for every layer, "
            f"but this model mixes layer types {sorted(set(types))}. Use "
            "method='per_layer'."
        )


def _capture_batches(
    hf_model: nn.Module,
    texts: Sequence[str],
    *,
    tokenizer: Any,
    bos: bool,
    aggregation: str,
    batch_size: int,
    chat_template: bool,
    max_length: int | None,
    device: torch.device,
) -> list[_Batch]:
    """Tokenise the texts and keep each batch's input to the first layer."""
    first_layer = decoder_layers(hf_model)[1][0]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids = encode(
            chunk,
            tokenizer,
            bos=bos,
            chat_template=chat_template,
            max_length=max_length,
        )
        tokens, mask = pad(ids, pad_id, "right", device)
        captured: dict[str, Any] = {}

        def capture(
            module: Any, args: Any, kwargs: Any, captured: dict = captured
        ) -> None:
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = dict(kwargs)
            raise _Captured

        handle = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            hf_model(input_ids=tokens, attention_mask=mask, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        weights = token_weights(mask, aggregation, texts, start, "source")
        batches.append(
            _Batch(captured["hidden"], captured["kwargs"], weights, mask.unsqueeze(-1))
        )
    return batches


def _sweep(
    hf_model: nn.Module,
    texts: Sequence[str],
    target_means: Tensor,
    *,
    layers: tuple[int, ...],
    gains: Gains,
    alpha: float,
    hook_point: str,
    d_model: int,
    device: torch.device,
    bar: Any,
    **options: Any,
) -> Tensor:
    """Sequential r(k) with one layer-by-layer pass over the source texts."""
    _check_uniform_layers(hf_model, layers[-1])
    modules = decoder_layers(hf_model)[1]
    batches = _capture_batches(hf_model, texts, device=device, **options)
    bar.update(len(texts))
    controller = LayerController(gains)
    errors = []

    def measure_and_push(row: int) -> None:
        total = torch.zeros(d_model, dtype=torch.float64, device=device)
        for batch in batches:
            total += torch.einsum(
                "bpd,bp->d", batch.hidden.to(torch.float64), batch.weights
            )
        error = target_means[row] - total / len(texts)
        errors.append(error)
        edit = (alpha * controller.step(error)).to(batches[0].hidden.dtype)
        for batch in batches:
            batch.hidden = torch.where(
                batch.mask.bool(), batch.hidden + edit, batch.hidden
            )

    steered = {layer: row for row, layer in enumerate(layers)}
    for layer in range(layers[-1] + 1):
        if hook_point == "resid_pre" and layer in steered:
            measure_and_push(steered[layer])
        for batch in batches:
            output = modules[layer](batch.hidden, **batch.layer_kwargs)
            batch.hidden = output[0] if isinstance(output, tuple) else output
        if hook_point == "resid_post" and layer in steered:
            measure_and_push(steered[layer])
    return torch.stack(errors)


def _per_layer(
    hf_model: nn.Module,
    texts: Sequence[str],
    target_means: Tensor,
    *,
    layers: tuple[int, ...],
    gains: Gains,
    alpha: float,
    hook_point: str,
    d_model: int,
    device: torch.device,
    bar: Any,
    **options: Any,
) -> Tensor:
    """Sequential r(k) with one full forward pass per steered layer."""
    modules = decoder_layers(hf_model)[1]
    controller = LayerController(gains)
    errors, edits = [], []

    for row, layer in enumerate(layers):
        read = _hf_forward(hf_model, (layer,), hook_point)

        def forward(
            tokens: Tensor, mask: Tensor, reader: Callable, read=read, row=row
        ) -> None:
            handles = [
                _register_edit(modules[k], edit, mask, hook_point)
                for k, edit in zip(layers[:row], edits, strict=True)
            ]
            try:
                read(tokens, mask, reader)
            finally:
                for handle in handles:
                    handle.remove()

        mean = _side_means(
            texts,
            "source",
            forward,
            layers=(layer,),
            d_model=d_model,
            padding_side="right",
            device=device,
            bar=bar,
            **options,
        )[0]
        error = target_means[row] - mean
        errors.append(error)
        edits.append((alpha * controller.step(error)).to(torch.float32))
    return torch.stack(errors)


def _register_edit(
    module: nn.Module, edit: Tensor, mask: Tensor, hook_point: str
) -> Any:
    real = mask.unsqueeze(-1).bool()

    def post(module: Any, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        steered = torch.where(real, hidden + edit.to(hidden.dtype), hidden)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def pre(module: Any, args: Any, kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        steered = torch.where(real, hidden + edit.to(hidden.dtype), hidden)
        if args:
            return (steered, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": steered}

    if hook_point == "resid_post":
        return module.register_forward_hook(post)
    return module.register_forward_pre_hook(pre, with_kwargs=True)
