"""controllens: PID activation steering and curvature-aware merging of experts."""

from controllens.errors import (
    ControllensError,
    DataError,
    HookPointError,
    LayerError,
    MetadataMismatchError,
    ModelError,
    VectorError,
)
from controllens.models import (
    DEFAULT_MODEL,
    load_bridge,
    load_hf,
    load_nnsight,
)

__all__ = [
    "DEFAULT_MODEL",
    "ControllensError",
    "DataError",
    "HookPointError",
    "LayerError",
    "MetadataMismatchError",
    "ModelError",
    "VectorError",
    "load_bridge",
    "load_hf",
    "load_nnsight",
]
