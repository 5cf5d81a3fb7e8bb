"""Sequential (closed-loop) estimation of the error signal r(k), for every method.

Non-sequential estimation measures every r(k) on clean activations. Sequential
estimation, as in Mean-AcT and the paper's PID-AcT, measures r(k) (and, for
the transport, rotation and PCA methods, the variances and principal axes) on
source activations already steered at the earlier layers:

    r(k) = mu_target(k) - mean_x[ h_k(x; steered at k0, ..., k-1) ]

so each layer corrects what the earlier edits left over. The reference code
runs one forward pass over the data per steered layer. :func:`sequential_steering`
instead sweeps the data through the model one layer at a time, holding every
text's hidden state between layers: one forward's worth of compute in all, at
the price of keeping one layer's activations of the texts in memory.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from controllens.controllers import Gains
from controllens.data import ContrastiveTexts
from controllens.errors import ModelError
from controllens.steering import METHODS, Positions, Steering, Where
from controllens.tokens import resolve_tokenizer, token_weights
from controllens.vectors import (
    ContrastiveMeans,
    _batches,
    _check_options,
    _coerce_data,
    _hf_forward,
    _Moments,
    _side_means,
    _token_batches,
)

__all__ = ["sequential_steering"]

logger = logging.getLogger(__name__)

# the methods whose operators need variances or principal axes
_MOMENT_METHODS = ("pca", "transport", "rotate")
_STRATEGIES = ("sweep", "per_layer")


class _Captured(Exception):
    """Raised from the first layer's pre-hook once its inputs are captured."""


@dataclass
class _Batch:
    hidden: Tensor
    layer_kwargs: dict[str, Any]
    weights: Tensor
    mask: Tensor
    state: dict[Any, Any] = field(default_factory=dict)

    def vectors(self) -> Tensor:
        """One float64 vector per text (the aggregation's token weights)."""
        return torch.einsum("bpd,bp->bd", self.hidden.to(torch.float64), self.weights)

    def where(self) -> Where:
        """Right-padded rows: every text starts at column 0."""
        batch, width = self.hidden.shape[:2]
        columns = torch.arange(width, device=self.hidden.device)
        first = torch.zeros(batch, dtype=torch.long, device=self.hidden.device)
        return Where(columns, first, width)


def sequential_steering(
    model: Any,
    data: ContrastiveTexts | None = None,
    *,
    target: Sequence[str] | None = None,
    source: Sequence[str] | None = None,
    tokenizer: Any = None,
    layers: int | Sequence[int] | None = None,
    method: str = "add",
    gains: Gains | None = None,
    alpha: float = 1.0,
    angle: float | None = None,
    one_sided: bool = True,
    token_ki: float = 0.0,
    positions: Positions = "all",
    hook_point: str = "resid_post",
    aggregation: str = "mean",
    batch_size: int = 16,
    chat_template: bool = False,
    max_length: int | None = None,
    strategy: Literal["sweep", "per_layer"] = "sweep",
    progress: bool = True,
) -> Steering:
    """Estimate the steering of any method sequentially, layer after layer.

    During estimation every real token of the source texts is edited at each
    earlier steered layer j by the steering built from the statistics measured
    so far (the method's operator with the PID signal of the errors up to j);
    the returned :class:`Steering` is built from exactly those statistics, so
    it recomputes the same edits.

    Args:
        model: A TransformerBridge, nnsight LanguageModel or HF causal LM.
        data: Target and source texts (or pass ``target`` and ``source``).
        target: Texts of the behaviour to steer towards (measured clean).
        source: Texts of the behaviour to steer away from (measured steered).
        tokenizer: Needed only for a plain HF model.
        layers: Layers to steer; None for all.
        method: The steering method, one of
            :data:`~controllens.steering.METHODS` (see
            :meth:`Steering.from_means`).
        gains: Controller gains; default P with Kp = 1.
        alpha: Strength used during estimation and kept in the result.
        angle: Rotation angle in degrees for ``method="rotate"``.
        one_sided: For ``method="feedback"``.
        token_ki: For ``method="feedback"``: integral gain across tokens.
        positions: Token positions of the returned steering (estimation
            steers every real token).
        hook_point: ``"resid_post"`` or ``"resid_pre"``.
        aggregation: ``"mean"`` (real tokens but the first) or ``"last"``.
        batch_size: Texts per batch.
        chat_template: Wrap texts in the tokenizer's chat template.
        max_length: Truncate texts to this many tokens.
        strategy: ``"sweep"`` (one layer-by-layer pass over the data) or
            ``"per_layer"`` (one full forward pass per steered layer, the
            reference approach; slower, for checking and benchmarks).
        progress: Show a progress bar.

    Returns:
        A :class:`Steering` of the method whose statistics are sequential.

    Examples:
        >>> from controllens.testing import tiny_llama, tiny_tokenizer
        >>> steering = sequential_steering(
        ...     tiny_llama(), target=["so good", "lovely"], source=["bad", "awful"],
        ...     tokenizer=tiny_tokenizer(), gains=Gains.pi(), progress=False)
        >>> steering.layers, tuple(steering.errors.shape)
        ((0, 1, 2), (3, 32))
        >>> sequential_steering(
        ...     tiny_llama(), target=["so good", "lovely"], source=["bad", "awful"],
        ...     tokenizer=tiny_tokenizer(), method="transport", alpha=0.5,
        ...     progress=False).operator.name
        'transport'
    """
    data = _coerce_data(data, target, source)
    check_hook_point(hook_point)
    _check_options(aggregation, batch_size, "right", max_length)
    if method in _STRATEGIES:
        raise ValueError(
            f"method={method!r} is an estimation strategy: pass "
            f"strategy={method!r}; method= names the steering method "
            f"({', '.join(map(repr, METHODS))})."
        )
    if method not in METHODS:
        raise ValueError(
            f"Unknown steering method {method!r}; valid choices: "
            f"{', '.join(map(repr, METHODS))}."
        )
    if strategy not in _STRATEGIES:
        raise ValueError(
            f"Unknown strategy {strategy!r}; valid choices: 'sweep', 'per_layer'."
        )
    if method == "rotate" and angle is None:
        raise ValueError("method='rotate' needs angle=, in degrees within [-180, 180].")
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
    estimate = _Estimate(
        layers=chosen,
        method=method,
        settings={
            "gains": gains,
            "alpha": alpha,
            "angle": angle,
            "one_sided": one_sided,
            "token_ki": token_ki,
        },
        fields={
            "hook_point": hook_point,
            "aggregation": aggregation,
            "model_name": info.name,
            "n_layers": info.n_layers,
            "d_model": info.d_model,
            "n_target": len(data.target),
            "n_source": len(data.source),
        },
    )

    passes = 1 if strategy == "sweep" else len(chosen)
    bar = tqdm(
        total=len(data.target) + len(data.source) * passes,
        desc=f"sequential {method}, {strategy}",
        disable=not progress,
        unit="text",
    )
    run = _sweep if strategy == "sweep" else _per_layer
    with torch.inference_mode(), bar:
        run(
            info.hf_model,
            data,
            estimate,
            hook_point=hook_point,
            device=info.device,
            bar=bar,
            **options,
        )
    return estimate.steering(positions=positions)


class _Estimate:
    """The statistics measured so far, layer by layer, and their steering."""

    def __init__(
        self,
        *,
        layers: tuple[int, ...],
        method: str,
        settings: dict[str, Any],
        fields: dict[str, Any],
    ) -> None:
        self.layers = layers
        self.method = method
        self.settings = settings
        self.fields = fields
        self.moments = method in _MOMENT_METHODS
        self.rows: dict[str, list[Tensor]] = {}
        # clean target means of every steered layer [layer, d_model], filled
        # before (or, in a sweep with moments, while) the layers are measured
        self.target_means: Tensor | None = None

    def add(self, layer: int, target: Tensor | None, source: Tensor) -> None:
        """Record one layer from per-text vectors ``[texts, d_model]``; the
        target's are needed only for the moments (else None)."""
        mu_source = source.mean(dim=0)
        mu_target = self.target_means[self.layers.index(layer)]
        row = {"mu_target": mu_target, "mu_source": mu_source}
        if self.moments:
            moments = _Moments(1, source.shape[1], source.device)
            moments.add("target", target[None])
            moments.add("source", source[None])
            moments.add_pairs(target[None], source[None])
            r = (mu_target - mu_source)[None].to(torch.float32).cpu()
            row |= {k: v[0] for k, v in moments.result(r, (layer,)).items()}
        for name, value in row.items():
            self.rows.setdefault(name, []).append(value.to(torch.float32).cpu())

    def means(self) -> ContrastiveMeans:
        done = len(self.rows["mu_source"])
        tensors = {name: torch.stack(rows) for name, rows in self.rows.items()}
        return ContrastiveMeans(layers=self.layers[:done], **tensors, **self.fields)

    def steering(self, **kwargs: Any) -> Steering:
        """The steering of the layers recorded so far."""
        return Steering.from_means(
            self.means(), method=self.method, **self.settings, **kwargs
        )


def _check_uniform_layers(hf_model: nn.Module, deepest: int) -> None:
    types = getattr(hf_model.config, "layer_types", None)
    if types and len(set(types[: deepest + 1])) > 1:
        raise ModelError(
            f"The layer-by-layer sweep reuses one attention mask for every layer, "
            f"but this model mixes layer types {sorted(set(types))}. Use "
            "strategy='per_layer'."
        )


def _capture_batches(
    hf_model: nn.Module,
    texts: Sequence[str],
    side: str,
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
    batches = []
    tokenised = _token_batches(
        texts,
        side,
        tokenizer=tokenizer,
        bos=bos,
        chat_template=chat_template,
        max_length=max_length,
        batch_size=batch_size,
        padding_side="right",
        device=device,
    )
    for start, tokens, mask in tokenised:
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
        weights = token_weights(mask, aggregation, texts, start, side)
        batches.append(
            _Batch(captured["hidden"], captured["kwargs"], weights, mask.unsqueeze(-1))
        )
    return batches


def _target_means(
    hf_model: nn.Module,
    data: ContrastiveTexts,
    estimate: _Estimate,
    *,
    hook_point: str,
    device: torch.device,
    bar: Any,
    **options: Any,
) -> Tensor:
    """Clean target means of every steered layer, in one forward pass."""
    return _side_means(
        data.target,
        "target",
        _hf_forward(hf_model, estimate.layers, hook_point),
        layers=estimate.layers,
        d_model=estimate.fields["d_model"],
        padding_side="right",
        device=device,
        bar=bar,
        **options,
    )


def _sweep(
    hf_model: nn.Module,
    data: ContrastiveTexts,
    estimate: _Estimate,
    *,
    hook_point: str,
    device: torch.device,
    bar: Any,
    **options: Any,
) -> None:
    """Sequential statistics with one layer-by-layer pass over the texts.

    The source batches are edited after each steered layer; the target
    batches (swept alongside only when the method needs the target's per-text
    vectors) never are.
    """
    layers = estimate.layers
    _check_uniform_layers(hf_model, layers[-1])
    modules = decoder_layers(hf_model)[1]
    source = _capture_batches(hf_model, data.source, "source", device=device, **options)
    bar.update(len(data.source))
    target: list[_Batch] = []
    if estimate.moments:
        target = _capture_batches(
            hf_model, data.target, "target", device=device, **options
        )
        bar.update(len(data.target))
    else:
        estimate.target_means = _target_means(
            hf_model,
            data,
            estimate,
            hook_point=hook_point,
            device=device,
            bar=bar,
            **options,
        )

    def measure_and_edit(layer: int) -> None:
        target_vectors = None
        if target:
            target_vectors = torch.cat([batch.vectors() for batch in target])
            estimate.target_means = _grow(estimate, layer, target_vectors.mean(dim=0))
        estimate.add(
            layer, target_vectors, torch.cat([batch.vectors() for batch in source])
        )
        steering = estimate.steering()
        for batch in source:
            edited = steering.edit(layer, batch.hidden, batch.where(), batch.state)
            batch.hidden = torch.where(batch.mask.bool(), edited, batch.hidden)

    for layer in range(layers[-1] + 1):
        if hook_point == "resid_pre" and layer in layers:
            measure_and_edit(layer)
        for batch in (*source, *target):
            output = modules[layer](batch.hidden, **batch.layer_kwargs)
            batch.hidden = output[0] if isinstance(output, tuple) else output
        if hook_point == "resid_post" and layer in layers:
            measure_and_edit(layer)


def _grow(estimate: _Estimate, layer: int, mean: Tensor) -> Tensor:
    """The target means with the row of ``layer`` filled in."""
    means = estimate.target_means
    if means is None:
        means = mean.new_zeros(len(estimate.layers), mean.shape[0])
    means[estimate.layers.index(layer)] = mean
    return means


def _per_layer(
    hf_model: nn.Module,
    data: ContrastiveTexts,
    estimate: _Estimate,
    *,
    hook_point: str,
    device: torch.device,
    bar: Any,
    **options: Any,
) -> None:
    """Sequential statistics with one full forward pass per steered layer."""
    layers = estimate.layers
    modules = decoder_layers(hf_model)[1]
    shared = dict(
        d_model=estimate.fields["d_model"],
        padding_side="right",
        device=device,
        **options,
    )
    target_vectors = None
    if estimate.moments:
        batches = list(
            _batches(
                data.target,
                "target",
                _hf_forward(hf_model, layers, hook_point),
                layers=layers,
                per_text=True,
                **shared,
            )
        )
        bar.update(len(data.target))
        target_vectors = torch.cat([b.vectors for b in batches], dim=1)
        estimate.target_means = target_vectors.mean(dim=1)
    else:
        estimate.target_means = _target_means(
            hf_model,
            data,
            estimate,
            hook_point=hook_point,
            device=device,
            bar=bar,
            **options,
        )

    for row, layer in enumerate(layers):
        steering = estimate.steering() if row else None
        read = _hf_forward(hf_model, (layer,), hook_point)

        def forward(
            tokens: Tensor, mask: Tensor, reader: Callable, read=read, steering=steering
        ) -> None:
            handles = []
            if steering is not None:
                state: dict[Any, Any] = {}
                handles = [
                    _register_edit(modules[k], k, steering, mask, hook_point, state)
                    for k in steering.layers
                ]
            try:
                read(tokens, mask, reader)
            finally:
                for handle in handles:
                    handle.remove()

        vectors = [
            batch.vectors[0]
            for batch in _batches(
                data.source, "source", forward, layers=(layer,), per_text=True, **shared
            )
        ]
        bar.update(len(data.source))
        estimate.add(
            layer,
            None if target_vectors is None else target_vectors[row],
            torch.cat(vectors),
        )


def _register_edit(
    module: nn.Module,
    layer: int,
    steering: Steering,
    mask: Tensor,
    hook_point: str,
    state: dict[Any, Any],
) -> Any:
    """A PyTorch hook that applies ``steering`` at ``layer`` to real tokens."""
    real = mask.unsqueeze(-1).bool()
    batch, width = mask.shape
    where = Where(
        torch.arange(width, device=mask.device),
        torch.zeros(batch, dtype=torch.long, device=mask.device),
        width,
    )

    def edit(hidden: Tensor) -> Tensor:
        if layer == steering.layers[0]:
            state.clear()
        return torch.where(real, steering.edit(layer, hidden, where, state), hidden)

    def post(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    def pre(module: Any, args: Any, kwargs: Any) -> Any:
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    if hook_point == "resid_post":
        return module.register_forward_hook(post)
    return module.register_forward_pre_hook(pre, with_kwargs=True)
