"""Exceptions raised by controllens.

Each one subclasses the built-in exception a caller would expect (``ValueError``
or ``TypeError``), so ``except ValueError`` keeps working, while
``except ControllensError`` catches only ours.
"""

__all__ = [
    "ControllensError",
    "DataError",
    "HookPointError",
    "LayerError",
    "MergeError",
    "MetadataMismatchError",
    "ModelError",
    "VectorError",
]


class ControllensError(Exception):
    """Base class of every error controllens raises on bad input.

    Its message ends with the documentation page of the error's class, which
    explains the usual causes and fixes.

    Examples:
        >>> str(LayerError("Layer 9 is outside the model."))
        'Layer 9 is outside the model. (docs/errors/LayerError.md)'
    """

    def __str__(self) -> str:
        return f"{super().__str__()} (docs/errors/{type(self).__name__}.md)"


class ModelError(ControllensError, ValueError):
    """A model that cannot be loaded, wrapped or recognised.

    Examples:
        >>> from controllens.adapters import inspect_model
        >>> try:
        ...     inspect_model("gpt2")
        ... except ValueError as error:  # caught as a ValueError
        ...     print(type(error).__name__)
        ModelError
    """


class LayerError(ControllensError, ValueError):
    """A layer index outside the model.

    Examples:
        >>> from controllens.adapters import resolve_layers
        >>> try:
        ...     resolve_layers(9, n_layers=3)
        ... except ValueError as error:  # caught as a ValueError
        ...     print(type(error).__name__)
        LayerError
    """


class HookPointError(ControllensError, ValueError):
    """A hook point the model or the library does not have.

    Examples:
        >>> from controllens.adapters import tl_hook_name
        >>> try:
        ...     tl_hook_name("attn_out", 0)
        ... except ValueError as error:  # caught as a ValueError
        ...     print(type(error).__name__)
        HookPointError
    """


class VectorError(ControllensError, ValueError):
    """A steering vector of the wrong width, or with NaN or infinite entries.

    Examples:
        >>> import torch
        >>> from controllens.steering import Steering
        >>> try:
        ...     Steering(errors=torch.zeros(2, 8), layers=(0,))
        ... except ValueError as error:  # caught as a ValueError
        ...     print(type(error).__name__)
        VectorError
    """


class DataError(ControllensError, ValueError):
    """Contrastive data that is empty, one-sided or malformed.

    Examples:
        >>> from controllens.data import from_texts
        >>> try:
        ...     from_texts(["a joy"], [])
        ... except ValueError as error:  # caught as a ValueError
        ...     print(type(error).__name__)
        DataError
    """


class MetadataMismatchError(ControllensError, ValueError):
    """A saved file made for another model, hook point or layer set.

    Examples:
        >>> try:
        ...     raise MetadataMismatchError("Saved for layers (1, 2), not (3,).")
        ... except ValueError as error:  # caught as a ValueError
        ...     print(type(error).__name__)
        MetadataMismatchError
    """


class MergeError(ControllensError, ValueError):
    """Expert weights, routing weights or curvature factors that cannot be merged.

    Examples:
        >>> from controllens.camex.layers import MoEConfig
        >>> try:
        ...     MoEConfig(n_experts=0)
        ... except ValueError as error:  # caught as a ValueError
        ...     print(type(error).__name__)
        MergeError
    """
