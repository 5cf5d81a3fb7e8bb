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
    """A model that cannot be loaded, wrapped or recognised."""


class LayerError(ControllensError, ValueError):
    """A layer index outside the model."""


class HookPointError(ControllensError, ValueError):
    """A hook point the model or the library does not have."""


class VectorError(ControllensError, ValueError):
    """A steering vector of the wrong width, or with NaN or infinite entries."""


class DataError(ControllensError, ValueError):
    """Contrastive data that is empty, one-sided or malformed."""


class MetadataMismatchError(ControllensError, ValueError):
    """A saved file made for another model, hook point or layer set."""


class MergeError(ControllensError, ValueError):
    """Expert weights, routing weights or curvature factors that cannot be merged."""
