"""Per-layer contrastive means and the error signal r(k) they define.

For target texts (behaviour to move towards) and source texts (behaviour to
move away from), the error signal at layer k is
``r(k) = mu_target(k) - mu_source(k)`` (arXiv 2510.04309, Sec. 3), the mean
activation difference at a hook point. Means are running sums over batches, so
memory does not grow with the data. On request the same pass also measures the
second moments other steering operators need: per-dimension variances of each
side, the first principal axis of the pooled texts (angular steering) and that
of the paired differences (RepE-style PCA).
"""

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from controllens.adapters import (
    check_hook_point,
    decoder_layers,
    inspect_model,
    resolve_layers,
    tl_hook_name,
)
from controllens.data import ContrastiveTexts, from_texts
from controllens.errors import (
    DataError,
    LayerError,
    MetadataMismatchError,
    ModelError,
    VectorError,
)
from controllens.tokens import encode, pad, resolve_tokenizer, token_weights

__all__ = ["AGGREGATIONS", "ContrastiveMeans", "contrastive_means", "mean_activations"]

logger = logging.getLogger(__name__)

#: How token activations of one text become one vector.
AGGREGATIONS: tuple[str, ...] = ("last", "mean")
_MEANS = ("mu_target", "mu_source")
_MOMENTS = ("var_target", "var_source", "axis_pooled", "axis_paired")
# /1 holds the means only and is still written when there are no moments, so
# that older releases keep reading such files; /2 adds the moments
_FORMAT = "controllens.contrastive_means/1"
_FORMAT_MOMENTS = "controllens.contrastive_means/2"
# a stored principal axis may be off unit norm by float32 rounding, not more
_UNIT_TOLERANCE = 1e-4


@dataclass(frozen=True, kw_only=True, eq=False)
class ContrastiveMeans:
    """Mean activations of target and source texts at a set of layers.

    Attributes:
        mu_target: Mean target activation, one row per entry of ``layers``.
        mu_source: Mean source activation, one row per entry of ``layers``.
        layers: Model layer indices of the rows, ascending, non-negative.
        hook_point: ``"resid_post"`` or ``"resid_pre"``.
        aggregation: ``"last"`` (last real token of each text) or ``"mean"``
            (every real token but the first, averaged per text).
        model_name: Name of the model the means were measured on.
        n_layers: Number of layers of that model.
        d_model: Width of its residual stream.
        n_target: Number of target texts.
        n_source: Number of source texts.
        var_target: Per-dimension population variance (divided by n_target,
            not n_target - 1) of the per-text target vectors; None unless
            measured with ``contrastive_means(..., moments=True)``.
        var_source: The same for the source texts.
        axis_pooled: Unit first principal axis of the target and source
            vectors pooled and centred on their common mean, one row per
            layer, signed so that its projection on r(k) is positive; None
            unless measured. The default second axis of angular steering.
        axis_paired: Unit first principal axis of the paired differences
            target[i] - source[i] (uncentred, as in RepE), signed so that its
            projection on r(k) is positive; None unless measured. Blind to
            the sign of each difference: on CAA pairs read at the answer
            letter it is the letter axis x_A - x_B (measured on SmolLM2).

    Examples:
        >>> means = ContrastiveMeans(
        ...     mu_target=torch.ones(2, 4), mu_source=torch.zeros(2, 4),
        ...     layers=(1, 3), hook_point="resid_post", aggregation="mean",
        ...     model_name="toy", n_layers=4, d_model=4, n_target=5, n_source=5)
        >>> means.error(-1)
        tensor([1., 1., 1., 1.])
        >>> means.axis_paired is None
        True
    """

    mu_target: Float[Tensor, "layer d_model"]
    mu_source: Float[Tensor, "layer d_model"]
    layers: tuple[int, ...]
    hook_point: str = "resid_post"
    aggregation: str
    model_name: str
    n_layers: int
    d_model: int
    n_target: int
    n_source: int
    var_target: Float[Tensor, "layer d_model"] | None = None
    var_source: Float[Tensor, "layer d_model"] | None = None
    axis_pooled: Float[Tensor, "layer d_model"] | None = None
    axis_paired: Float[Tensor, "layer d_model"] | None = None

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        check_hook_point(self.hook_point)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"Expected aggregation in {AGGREGATIONS}, got {self.aggregation!r}."
            )
        if list(layers) != sorted(set(layers)) or not layers:
            raise LayerError(
                f"Expected layers unique and ascending, got {layers}. Sort them "
                "and reorder the rows of mu_target and mu_source to match."
            )
        if layers[0] < 0 or layers[-1] >= self.n_layers:
            raise LayerError(
                f"Expected layers in 0..{self.n_layers - 1} (the model has "
                f"{self.n_layers} layers), got {layers}."
            )
        for name in _MEANS:
            self._check_tensor(name, getattr(self, name))
        if self.n_target < 1 or self.n_source < 1:
            raise DataError(
                f"Expected n_target and n_source >= 1, got {self.n_target} and "
                f"{self.n_source}."
            )
        for name in _MOMENTS:
            if getattr(self, name) is not None:
                self._check_tensor(name, getattr(self, name))
                self._check_moment(name, getattr(self, name))

    def _check_tensor(self, name: str, value: Tensor) -> None:
        expected = (len(self.layers), self.d_model)
        if tuple(value.shape) != expected:
            raise VectorError(
                f"Expected {name} of shape (layer, d_model) = {expected} for "
                f"layers {self.layers} and d_model {self.d_model}, got "
                f"{tuple(value.shape)}."
            )
        finite = torch.isfinite(value).all(dim=-1)
        if not finite.all():
            bad = [
                k for k, ok in zip(self.layers, finite.tolist(), strict=True) if not ok
            ]
            raise VectorError(
                f"Expected finite values in {name}, got NaN or infinite entries at "
                f"layers {bad}. Re-estimate the means (in float32 if the model "
                "runs in half precision)."
            )
        # a private copy: later edits of the caller's tensor never reach us
        object.__setattr__(self, name, value.detach().clone())

    def _check_moment(self, name: str, value: Tensor) -> None:
        if name.startswith("var"):
            bad = (value < 0).any(dim=-1)
            expected, received = "variances >= 0", "negative entries"
        else:
            norm = value.double().norm(dim=-1)
            bad = (norm - 1).abs() > _UNIT_TOLERANCE
            expected = "unit rows (norm 1)"
            received = f"norms {[round(x, 4) for x in norm[bad].tolist()]}"
        if bad.any():
            layers = [k for k, b in zip(self.layers, bad.tolist(), strict=True) if b]
            raise VectorError(
                f"Expected {name} to hold {expected}, got {received} at layers "
                f"{layers}. Pass the tensors contrastive_means(..., moments=True) "
                "measures, or re-measure them."
            )

    def _moment(self, name: str) -> Float[Tensor, "layer d_model"]:
        value = getattr(self, name)
        if value is None:
            raise VectorError(
                f"Expected means with {name}, got means without moments "
                "(measured with moments=False, or loaded from a file saved "
                "without them). Re-run contrastive_means(..., moments=True)."
            )
        return value

    @property
    def has_moments(self) -> bool:
        """Whether every moment (variances and both principal axes) is present."""
        return all(getattr(self, name) is not None for name in _MOMENTS)

    @property
    def r(self) -> Float[Tensor, "layer d_model"]:
        """The error signal r(k) = mu_target(k) - mu_source(k), one row per layer."""
        return self.mu_target - self.mu_source

    @property
    def pca_r(self) -> Float[Tensor, "layer d_model"]:
        """The PCA (RepE) error signal: r(k) projected on the paired axis.

        ``(axis_paired(k) . r(k)) axis_paired(k)`` per layer: the part of the
        mean difference along the first principal axis of the paired
        differences. Its length is at most that of r(k), and equals it only
        where the axis is parallel to r(k).

        Raises:
            VectorError: If the means were measured without moments.

        Examples:
            >>> means = ContrastiveMeans(
            ...     mu_target=torch.tensor([[3.0, 4.0]]),
            ...     mu_source=torch.zeros(1, 2), layers=(0,),
            ...     aggregation="last", model_name="toy", n_layers=1, d_model=2,
            ...     n_target=2, n_source=2, axis_paired=torch.tensor([[1.0, 0.0]]))
            >>> means.pca_r
            tensor([[3., 0.]])
        """
        axis = self._moment("axis_paired")
        return (axis * self.r).sum(dim=-1, keepdim=True) * axis

    def error(self, layer: int) -> Float[Tensor, " d_model"]:
        """The error signal r(k) at one model layer.

        Args:
            layer: A model layer index; negative indices count from the end of
                the model.

        Returns:
            r(layer), a new tensor.

        Raises:
            LayerError: If the means do not cover that layer.
        """
        (resolved,) = resolve_layers(layer, self.n_layers)
        if resolved not in self.layers:
            raise LayerError(
                f"Layer {layer} has no measured means; these cover layers "
                f"{self.layers}. Re-estimate with layers=... including it."
            )
        row = self.layers.index(resolved)
        return self.mu_target[row] - self.mu_source[row]

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-serialisable values."""
        return {
            "layers": list(self.layers),
            "hook_point": self.hook_point,
            "aggregation": self.aggregation,
            "model_name": self.model_name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_target": self.n_target,
            "n_source": self.n_source,
        }

    def check_compatible(self, model: Any, *, hook_point: str | None = None) -> None:
        """Refuse a model (or hook point) these means were not measured on.

        Args:
            model: Any model controllens accepts.
            hook_point: The hook point the caller wants to use, if any.

        Raises:
            MetadataMismatchError: If the model's name (when both are known),
                number of layers or width, or the hook point, differ.

        Examples:
            >>> from controllens.testing import tiny_llama
            >>> means = ContrastiveMeans(
            ...     mu_target=torch.ones(1, 32), mu_source=torch.zeros(1, 32),
            ...     layers=(0,), aggregation="last", model_name="tiny-llama",
            ...     n_layers=3, d_model=32, n_target=1, n_source=1)
            >>> means.check_compatible(tiny_llama())
            >>> means.check_compatible(tiny_llama(d_model=16))
            Traceback (most recent call last):
            ...
            controllens.errors.MetadataMismatchError: These means were measured on \
another model or hook point (saved vs requested): d_model 32 vs 16. Re-estimate \
them with contrastive_means on this model. (docs/errors/MetadataMismatchError.md)
        """
        info = inspect_model(model)
        problems = []
        names = {self.model_name, info.name}
        if "unknown" not in names and len(names) > 1:
            problems.append(f"model {self.model_name!r} vs {info.name!r}")
        if info.n_layers != self.n_layers:
            problems.append(f"n_layers {self.n_layers} vs {info.n_layers}")
        if info.d_model != self.d_model:
            problems.append(f"d_model {self.d_model} vs {info.d_model}")
        if hook_point is not None and hook_point != self.hook_point:
            problems.append(f"hook point {self.hook_point!r} vs {hook_point!r}")
        if problems:
            raise MetadataMismatchError(
                "These means were measured on another model or hook point (saved "
                f"vs requested): {'; '.join(problems)}. Re-estimate them with "
                "contrastive_means on this model."
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the means as safetensors, metadata in the file's header.

        The moments that were measured are saved beside the means. A file
        without moments keeps format ``controllens.contrastive_means/1``, which
        earlier releases read; one with moments is ``.../2``.

        Args:
            path: The file to write (conventionally ``*.safetensors``).

        Returns:
            The path written.
        """
        path = Path(path)
        header = {key: json.dumps(value) for key, value in self.metadata().items()}
        names = [*_MEANS, *(n for n in _MOMENTS if getattr(self, n) is not None)]
        header["format"] = _FORMAT if len(names) == len(_MEANS) else _FORMAT_MOMENTS
        tensors = {
            name: getattr(self, name).detach().cpu().contiguous() for name in names
        }
        save_file(tensors, str(path), metadata=header)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: Any = None,
        *,
        hook_point: str | None = None,
    ) -> "ContrastiveMeans":
        """Read means written by :meth:`save`.

        Args:
            path: The safetensors file.
            model: If given, refuse the file unless it was made for this model.
            hook_point: If given, refuse the file unless it was made for this
                hook point.

        Returns:
            The means, on the CPU.

        Raises:
            MetadataMismatchError: If the file was made for another model or
                hook point, or was not written by :meth:`save`.

        Examples:
            >>> import tempfile
            >>> means = ContrastiveMeans(
            ...     mu_target=torch.ones(1, 4), mu_source=torch.zeros(1, 4),
            ...     layers=(0,), aggregation="last", model_name="toy",
            ...     n_layers=2, d_model=4, n_target=1, n_source=1)
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     path = means.save(Path(tmp) / "toy.safetensors")
            ...     ContrastiveMeans.load(path).r
            tensor([[1., 1., 1., 1.]])
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No saved means at {str(path)!r}.")
        try:
            tensors, header = _read_file(path)
            names = set(cls.__dataclass_fields__) - {*_MEANS, *_MOMENTS}
            fields = {key: json.loads(header[key]) for key in names}
            fields["layers"] = tuple(fields["layers"])
            means = cls(**tensors, **fields)
        except MetadataMismatchError:
            raise
        except (SafetensorError, KeyError, ValueError, TypeError) as err:
            raise MetadataMismatchError(
                f"{str(path)!r} is not a valid file written by "
                f"ContrastiveMeans.save ({type(err).__name__}: {err}). Re-measure "
                "the means and save them again."
            ) from err
        if model is not None or hook_point is not None:
            if model is None:
                if hook_point != means.hook_point:
                    raise MetadataMismatchError(
                        f"Expected means at hook point {hook_point!r}, but "
                        f"{str(path)!r} holds means at {means.hook_point!r}."
                    )
            else:
                means.check_compatible(model, hook_point=hook_point)
        return means


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    # safetensors parses a JSON header and raw tensors: nothing is executed
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        keys = set(f.keys())
        known = (_FORMAT, _FORMAT_MOMENTS)
        if header.get("format") not in known or not set(_MEANS) <= keys:
            raise MetadataMismatchError(
                f"Expected a file written by ContrastiveMeans.save (format "
                f"{' or '.join(map(repr, known))}), got format "
                f"{header.get('format')!r} in {str(path)!r}."
            )
        names = _MEANS if header["format"] == _FORMAT else (*_MEANS, *_MOMENTS)
        tensors = {key: f.get_tensor(key) for key in names if key in keys}
    return tensors, header


class _StopForward(Exception):
    """Raised from a hook once the deepest needed layer has been read."""


def _coerce_data(
    data: ContrastiveTexts | None,
    target: Sequence[str] | None,
    source: Sequence[str] | None,
) -> ContrastiveTexts:
    if data is not None:
        if target is not None or source is not None:
            raise DataError(
                "Expected either data=ContrastiveTexts(...) or target= and source=, "
                "got both. Pass one of the two."
            )
        if not isinstance(data, ContrastiveTexts):
            raise TypeError(
                f"Expected data to be ContrastiveTexts, got {type(data).__name__}. "
                "Build it with controllens.data.from_texts(target, source)."
            )
        return data
    if target is None or source is None:
        raise DataError(
            "Expected both target and source texts, got "
            f"{'no target' if target is None else 'target'} and "
            f"{'no source' if source is None else 'source'}. Contrastive means need "
            "both sides."
        )
    return from_texts(target, source)


def _check_options(
    aggregation: str, batch_size: int, padding_side: str, max_length: int | None
) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"Expected aggregation in {AGGREGATIONS}, got {aggregation!r}."
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(f"Expected batch_size a positive integer, got {batch_size!r}.")
    if padding_side not in ("left", "right"):
        raise ValueError(
            f"Expected padding_side 'left' or 'right', got {padding_side!r}."
        )
    least = 2 if aggregation == "mean" else 1
    if max_length is not None and max_length < least:
        raise ValueError(
            f"Expected max_length >= {least} with aggregation {aggregation!r} (or "
            f"None), got {max_length}."
        )


def _tl_forward(
    model: Any, layers: tuple[int, ...], hook_point: str, n_layers: int
) -> Callable[[Tensor, Tensor, Callable[[int, Tensor], None]], None]:
    def forward(tokens: Tensor, mask: Tensor, read: Callable[[int, Tensor], None]):
        def hook_for(layer: int) -> Callable[..., Tensor]:
            def hook(activation: Tensor, hook: Any) -> Tensor:
                read(layer, activation)
                return activation

            return hook

        stop = layers[-1] + 1
        model.run_with_hooks(
            tokens,
            fwd_hooks=[(tl_hook_name(hook_point, k), hook_for(k)) for k in layers],
            attention_mask=mask,
            stop_at_layer=stop if stop < n_layers else None,
            return_type=None if stop >= n_layers else "logits",
        )

    return forward


def _hf_forward(
    hf_model: torch.nn.Module, layers: tuple[int, ...], hook_point: str
) -> Callable[[Tensor, Tensor, Callable[[int, Tensor], None]], None]:
    modules = decoder_layers(hf_model)[1]
    deepest = layers[-1]

    def forward(tokens: Tensor, mask: Tensor, read: Callable[[int, Tensor], None]):
        def post_hook(layer: int) -> Callable[..., None]:
            def hook(module: Any, args: Any, output: Any) -> None:
                read(layer, output[0] if isinstance(output, tuple) else output)
                if layer == deepest:
                    raise _StopForward

            return hook

        def pre_hook(layer: int) -> Callable[..., None]:
            def hook(module: Any, args: Any, kwargs: Any) -> None:
                read(layer, args[0] if args else kwargs["hidden_states"])
                if layer == deepest:
                    raise _StopForward

            return hook

        handles = []
        try:
            for k in layers:
                if hook_point == "resid_post":
                    handle = modules[k].register_forward_hook(post_hook(k))
                else:
                    handle = modules[k].register_forward_pre_hook(
                        pre_hook(k), with_kwargs=True
                    )
                handles.append(handle)
            # positions count real tokens only, so left padding does not shift
            # them (matters for absolute position embeddings)
            position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
            hf_model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=False,
            )
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    return forward


def _token_batches(
    texts: Sequence[str],
    side: str,
    *,
    tokenizer: Any,
    bos: bool,
    chat_template: bool,
    max_length: int | None,
    batch_size: int,
    padding_side: str,
    device: torch.device,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Tokenise and pad the texts batch by batch: (start index, ids, mask)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        ids = encode(
            texts[start : start + batch_size],
            tokenizer,
            bos=bos,
            chat_template=chat_template,
            max_length=max_length,
        )
        empty = [start + i for i, row in enumerate(ids) if not row]
        if empty:
            raise DataError(
                f"The {side} text {empty[0]} tokenises to no tokens; remove it."
            )
        tokens, mask = pad(ids, pad_id, padding_side, device)
        yield start, tokens, mask


class _Batch(NamedTuple):
    size: int
    # float64 sum of the batch's per-text vectors, [layer, d_model]
    sums: Tensor
    # float64 per-text vectors [layer, batch, d_model], when asked for
    vectors: Tensor | None


def _batches(
    texts: Sequence[str],
    side: str,
    forward: Callable[..., None],
    *,
    tokenizer: Any,
    layers: tuple[int, ...],
    d_model: int,
    aggregation: str,
    batch_size: int,
    padding_side: str,
    bos: bool,
    chat_template: bool,
    max_length: int | None,
    device: torch.device,
    per_text: bool = False,
) -> Iterator[_Batch]:
    """Run the texts batch by batch, yielding each batch's aggregated vectors."""
    row_of = {layer: row for row, layer in enumerate(layers)}
    batches = _token_batches(
        texts,
        side,
        tokenizer=tokenizer,
        bos=bos,
        chat_template=chat_template,
        max_length=max_length,
        batch_size=batch_size,
        padding_side=padding_side,
        device=device,
    )
    for start, tokens, mask in batches:
        batch = texts[start : start + batch_size]
        weights = token_weights(mask, aggregation, texts, start, side)
        sums = torch.zeros(len(layers), d_model, dtype=torch.float64, device=device)
        vectors = None
        if per_text:
            vectors = sums.new_zeros(len(layers), len(batch), d_model)

        def read(
            layer: int,
            activation: Tensor,
            weights: Tensor = weights,
            sums: Tensor = sums,
            vectors: Tensor | None = vectors,
        ) -> None:
            # one batch is reduced in (at least) float32 without a float64 copy
            # of the activations; sums over batches are float64
            dtype = torch.promote_types(activation.dtype, torch.float32)
            activation, weights = activation.to(dtype), weights.to(dtype)
            row = row_of[layer]
            sums[row] = torch.einsum("bpd,bp->d", activation, weights)
            if vectors is not None:
                vectors[row] = torch.einsum("bpd,bp->bd", activation, weights)

        forward(tokens, mask, read)
        yield _Batch(len(batch), sums, vectors)


def _side_means(
    texts: Sequence[str],
    side: str,
    forward: Callable[..., None],
    *,
    bar: Any,
    **options: Any,
) -> Tensor:
    # float64 running sums of per-text vectors: memory is O(layers x d_model)
    sums = torch.zeros(
        len(options["layers"]),
        options["d_model"],
        dtype=torch.float64,
        device=options["device"],
    )
    for batch in _batches(texts, side, forward, **options):
        sums += batch.sums
        bar.update(batch.size)
    return sums / len(texts)


class _Moments:
    """Running float64 sums for the variances and the two principal axes.

    Memory: two [layer, d_model, d_model] float64 matrices (pooled sum of
    x x^T, paired sum of d d^T) and a few [layer, d_model] rows, whatever the
    number of texts.
    """

    def __init__(self, n_rows: int, d_model: int, device: torch.device) -> None:
        rows = torch.zeros(n_rows, d_model, dtype=torch.float64, device=device)
        # vectors are taken relative to the first batch's mean, so that
        # E[x^2] - E[x]^2 cancels little even in dimensions with a large mean
        self.shift: Tensor | None = None
        self.count = {"target": 0, "source": 0}
        self.sums = {"target": rows.clone(), "source": rows.clone()}
        self.squares = {"target": rows.clone(), "source": rows.clone()}
        self.pooled = rows.new_zeros(n_rows, d_model, d_model)
        self.paired = rows.new_zeros(n_rows, d_model, d_model)
        self.pairs = 0

    def add(self, side: str, vectors: Tensor) -> None:
        if self.shift is None:
            self.shift = vectors.mean(dim=1, keepdim=True)
        x = vectors - self.shift
        self.count[side] += x.shape[1]
        self.sums[side] += x.sum(dim=1)
        self.squares[side] += x.square().sum(dim=1)
        self.pooled.baddbmm_(x.transpose(1, 2), x)

    def add_pairs(self, target: Tensor, source: Tensor) -> None:
        # batch i of both sides covers the same text indices: row j of one is
        # paired with row j of the other, up to the shorter side's end
        n = min(target.shape[1], source.shape[1])
        diff = target[:, :n] - source[:, :n]
        self.paired.baddbmm_(diff.transpose(1, 2), diff)
        self.pairs += n

    def result(
        self, r: Float[Tensor, "layer d_model"], layers: tuple[int, ...]
    ) -> dict[str, Tensor]:
        """The :class:`ContrastiveMeans` moment fields, float32 on the CPU.

        ``r`` (float32, CPU: the r(k) the means will hold) signs the axes;
        ``layers`` names the rows in warnings.
        """
        moments = {}
        for side in ("target", "source"):
            mean = self.sums[side] / self.count[side]
            var = self.squares[side] / self.count[side] - mean.square()
            moments[f"var_{side}"] = var.clamp(min=0).to(torch.float32).cpu()
        n = self.count["target"] + self.count["source"]
        mean = (self.sums["target"] + self.sums["source"]) / n
        # one layer's matrix at a time: no second [layer, d_model, d_model]
        pooled = (
            self.pooled[i] / n - torch.outer(mean[i], mean[i]) for i in range(len(r))
        )
        paired = (self.paired[i] / self.pairs for i in range(len(r)))
        moments["axis_pooled"] = _principal_axis(pooled, r, "axis_pooled", layers)
        moments["axis_paired"] = _principal_axis(paired, r, "axis_paired", layers)
        return moments


def _principal_axis(
    matrices: Iterable[Tensor],
    r: Float[Tensor, "layer d_model"],
    name: str,
    layers: tuple[int, ...],
) -> Float[Tensor, "layer d_model"]:
    """Unit top eigenvector of each symmetric [d_model, d_model] matrix, float32
    on the CPU, signed to project positively on r (or, where it is orthogonal
    to r, to make its largest-magnitude entry positive)."""
    rows, tied = [], []
    for matrix in matrices:
        values, vectors = torch.linalg.eigh(matrix)
        rows.append(vectors[:, -1])
        top = float(values[-1])
        tied.append(len(values) > 1 and top - float(values[-2]) <= 1e-6 * max(top, 0))
    if any(tied):
        bad = [k for k, t in zip(layers, tied, strict=True) if t]
        warnings.warn(
            f"{name} is not unique at layers {bad}: the two largest eigenvalues "
            "are equal (no spread, or identical texts?). An arbitrary one of the "
            "tied axes was kept.",
            stacklevel=4,
        )
    axis = torch.stack(rows).to(torch.float32).cpu()
    axis = axis / axis.norm(dim=-1, keepdim=True)

    projection = (axis * r).sum(dim=-1)
    largest = axis.gather(-1, axis.abs().argmax(dim=-1, keepdim=True))[:, 0]
    sign = torch.where(projection != 0, projection.sign(), largest.sign())
    return axis * sign[:, None]


def _both_sides(
    data: ContrastiveTexts,
    forward: Callable[..., None],
    options: dict[str, Any],
    *,
    moments: bool,
    bar: Any,
) -> tuple[dict[str, Tensor], _Moments | None]:
    """Float64 sums of each side's per-text vectors, and their moments if asked.

    Target batch i runs, then source batch i (the same text indices), so the
    paired differences see both batches' per-text vectors; only these two are
    kept. Each side's batches are still summed in order, so the sums equal
    those of two separate passes bit for bit.
    """
    layers, d_model, device = options["layers"], options["d_model"], options["device"]
    sums = {
        side: torch.zeros(len(layers), d_model, dtype=torch.float64, device=device)
        for side in ("target", "source")
    }
    stats = _Moments(len(layers), d_model, device) if moments else None
    target, source = (
        _batches(getattr(data, side), side, forward, per_text=moments, **options)
        for side in ("target", "source")
    )

    for target_batch, source_batch in zip_longest(target, source):
        for side, batch in (("target", target_batch), ("source", source_batch)):
            if batch is None:  # the other side has more texts
                continue
            sums[side] += batch.sums
            if stats is not None:
                stats.add(side, batch.vectors)
            bar.update(batch.size)
        both = target_batch is not None and source_batch is not None
        if stats is not None and both:
            stats.add_pairs(target_batch.vectors, source_batch.vectors)
    return sums, stats


def _prepare(
    model: Any,
    *,
    tokenizer: Any,
    layers: int | Sequence[int] | None,
    hook_point: str,
    aggregation: str,
    batch_size: int,
    padding_side: str,
    chat_template: bool,
    prepend_bos: bool | None,
    max_length: int | None,
) -> tuple[Any, Callable[..., None], dict[str, Any]]:
    """Check the options; return the model's info, its reader and _side_means
    options."""
    check_hook_point(hook_point)
    _check_options(aggregation, batch_size, padding_side, max_length)
    if not isinstance(getattr(model, "parameters", None), Callable):
        raise ModelError(
            f"Expected a TransformerBridge, HookedTransformer, nnsight "
            f"LanguageModel or Hugging Face causal LM, got {type(model).__name__}."
        )
    info = inspect_model(model)
    chosen = resolve_layers(layers, info.n_layers)
    tokenizer, bos = resolve_tokenizer(info, tokenizer, chat_template, prepend_bos)

    if info.kind == "transformer_lens":
        forward = _tl_forward(model, chosen, hook_point, info.n_layers)
    else:
        if info.hf_model is None:
            raise ModelError(
                f"Found no Hugging Face module inside this {info.kind} model."
            )
        forward = _hf_forward(info.hf_model, chosen, hook_point)

    options = dict(
        tokenizer=tokenizer,
        layers=chosen,
        d_model=info.d_model,
        aggregation=aggregation,
        batch_size=batch_size,
        padding_side=padding_side,
        bos=bos,
        chat_template=chat_template,
        max_length=max_length,
        device=info.device,
    )
    return info, forward, options


def contrastive_means(
    model: Any,
    data: ContrastiveTexts | None = None,
    *,
    target: Sequence[str] | None = None,
    source: Sequence[str] | None = None,
    tokenizer: Any = None,
    layers: int | Sequence[int] | None = None,
    hook_point: str = "resid_post",
    aggregation: str = "mean",
    batch_size: int = 16,
    padding_side: str = "right",
    chat_template: bool = False,
    prepend_bos: bool | None = None,
    max_length: int | None = None,
    progress: bool = True,
    moments: bool = False,
) -> ContrastiveMeans:
    """Measure per-layer mean activations of target and source texts.

    Each text becomes one vector per layer: its last real token
    (``aggregation="last"``) or the average of its real tokens except the first
    (``"mean"``; the first token is an attention sink with a huge norm). The
    means over texts are running sums in float64, so memory does not grow with
    the data. Batches alternate between the sides (target texts i to i+b,
    then source texts i to i+b). Texts are tokenised by the model's Hugging
    Face tokenizer exactly once, with the BOS convention of that tokenizer (a
    TransformerBridge's own tokenizer always adds a BOS; its original
    convention is read back from a local tokenizer folder), so every back end
    sees the same tokens.

    TransformerLens models are read through their hook points
    (``blocks.{l}.hook_resid_post``) with an attention mask; Hugging Face and
    nnsight models through PyTorch hooks on the decoder layers (resid_post is
    a layer's output, resid_pre its input). The forward stops after the
    deepest requested layer.

    With ``moments=True`` the same pass also measures, over the same per-text
    vectors, what other steering operators need (see
    :class:`ContrastiveMeans`): the population variance of each side per
    dimension, the first principal axis of both sides pooled and centred
    (``axis_pooled``), and that of the paired differences target[i] -
    source[i] for i < min(n_target, n_source) (``axis_paired``, uncentred;
    pairs are index-aligned, as :func:`~controllens.data.load_caa` builds
    them). The means are bit-identical either way. It costs two float64
    [d_model, d_model] matrices per layer, 2 x layers x d_model^2 x 8 bytes
    (160 MB for all 30 layers of SmolLM2, 8.6 GB for 32 layers of width
    4096: pass fewer ``layers`` there), and one symmetric eigendecomposition
    per matrix at the end.

    Args:
        model: A TransformerBridge / HookedTransformer, nnsight LanguageModel
            or Hugging Face causal LM.
        data: Target and source texts; or pass ``target`` and ``source``.
        target: Texts showing the behaviour to steer towards.
        source: Texts showing the behaviour to steer away from.
        tokenizer: The tokenizer; needed only for a plain Hugging Face model
            (the other kinds carry theirs).
        layers: Model layers to measure (negative count from the end); None
            for all.
        hook_point: ``"resid_post"`` (after the block) or ``"resid_pre"``.
        aggregation: ``"mean"`` or ``"last"``.
        batch_size: Texts per forward pass.
        padding_side: ``"right"`` or ``"left"``; results agree within float
            tolerance.
        chat_template: Wrap each text as a user turn of the tokenizer's chat
            template, followed by the assistant header.
        prepend_bos: Start every text with the BOS token (True) or not
            (False); None follows the model's Hugging Face tokenizer (and the
            chat template, when applied).
        max_length: Truncate texts to this many tokens; None for no limit.
        progress: Show a progress bar.
        moments: Also measure the variances and principal axes.

    Returns:
        The means (with moments, if asked for), float32 on the CPU.

    Raises:
        DataError: Empty or one-sided data, or a text too short to aggregate.
        LayerError: A layer outside the model.
        HookPointError: An unknown hook point.
        ModelError: A model controllens does not recognise, or no tokenizer.

    Examples:
        >>> from controllens.testing import tiny_llama, tiny_tokenizer
        >>> means = contrastive_means(
        ...     tiny_llama(), target=["a joy to watch"], source=["a chore"],
        ...     tokenizer=tiny_tokenizer(), progress=False)
        >>> means.r.shape, means.layers
        (torch.Size([3, 32]), (0, 1, 2))
        >>> means = contrastive_means(
        ...     tiny_llama(), target=["a joy", "fun!"], source=["a chore", "meh"],
        ...     tokenizer=tiny_tokenizer(), moments=True, progress=False)
        >>> means.var_target.shape, means.axis_paired.shape
        (torch.Size([3, 32]), torch.Size([3, 32]))
        >>> (means.axis_paired * means.r).sum(dim=-1) > 0  # signed along r(k)
        tensor([True, True, True])
    """
    data = _coerce_data(data, target, source)
    info, forward, options = _prepare(
        model,
        tokenizer=tokenizer,
        layers=layers,
        hook_point=hook_point,
        aggregation=aggregation,
        batch_size=batch_size,
        padding_side=padding_side,
        chat_template=chat_template,
        prepend_bos=prepend_bos,
        max_length=max_length,
    )
    chosen = options["layers"]
    total = data.n_target + data.n_source
    with (
        torch.inference_mode(),
        tqdm(
            total=total, desc="contrastive means", unit="text", disable=not progress
        ) as bar,
    ):
        sums, stats = _both_sides(data, forward, options, moments=moments, bar=bar)

    mu_target = (sums["target"] / data.n_target).to(torch.float32).cpu()
    mu_source = (sums["source"] / data.n_source).to(torch.float32).cpu()
    extra = {} if stats is None else stats.result(mu_target - mu_source, chosen)
    logger.info(
        "Measured %s means of %d target and %d source texts at %d layers of %s",
        aggregation,
        data.n_target,
        data.n_source,
        len(chosen),
        info.name,
    )
    return ContrastiveMeans(
        mu_target=mu_target,
        mu_source=mu_source,
        **extra,
        layers=chosen,
        hook_point=hook_point,
        aggregation=aggregation,
        model_name=info.name,
        n_layers=info.n_layers,
        d_model=info.d_model,
        n_target=data.n_target,
        n_source=data.n_source,
    )


def mean_activations(
    model: Any,
    texts: Sequence[str],
    *,
    tokenizer: Any = None,
    layers: int | Sequence[int] | None = None,
    hook_point: str = "resid_post",
    aggregation: str = "mean",
    batch_size: int = 16,
    padding_side: str = "right",
    chat_template: bool = False,
    prepend_bos: bool | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> Float[Tensor, "layer d_model"]:
    """Per-layer mean activation of one set of texts, as the model runs now.

    The same measurement as one side of :func:`contrastive_means`. Inside
    ``steering.apply(model)`` it reads the steered activations, which is how
    the remaining error e(k) = mu_target(k) - mu_steered(k) is measured.

    Args:
        model: A TransformerBridge, nnsight LanguageModel or HF causal LM.
        texts: The texts.
        tokenizer: Needed only for a plain HF model.
        layers: Layers to read; None for all.
        hook_point: ``"resid_post"`` or ``"resid_pre"``.
        aggregation: ``"mean"`` or ``"last"``.
        batch_size: Texts per forward pass.
        padding_side: ``"right"`` or ``"left"``.
        chat_template: Wrap texts in the tokenizer's chat template.
        prepend_bos: Override the tokenizer's BOS convention.
        max_length: Truncate texts to this many tokens.
        progress: Show a progress bar.

    Returns:
        One float32 row per layer, in layer order.

    Examples:
        >>> from controllens.testing import tiny_llama, tiny_tokenizer
        >>> mean_activations(tiny_llama(), ["hello there"], layers=[-1],
        ...                  tokenizer=tiny_tokenizer(), progress=False).shape
        torch.Size([1, 32])
    """
    if isinstance(texts, str) or not texts:
        raise DataError(f"Expected a non-empty list of texts, got {texts!r:.60}.")
    _, forward, options = _prepare(
        model,
        tokenizer=tokenizer,
        layers=layers,
        hook_point=hook_point,
        aggregation=aggregation,
        batch_size=batch_size,
        padding_side=padding_side,
        chat_template=chat_template,
        prepend_bos=prepend_bos,
        max_length=max_length,
    )
    texts = tuple(texts)
    with (
        torch.inference_mode(),
        tqdm(total=len(texts), desc="means", unit="text", disable=not progress) as bar,
    ):
        means = _side_means(texts, "text", forward, bar=bar, **options)
    return means.to(torch.float32).cpu()
