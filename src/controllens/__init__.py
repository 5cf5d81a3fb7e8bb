"""controllens: PID activation steering and curvature-aware merging of experts.

Steering methods such as ActAdd and mean-difference are proportional
controllers across layers; controllens offers P, PI, PD and PID control as
TransformerLens hooks and nnsight interventions from one specification, for
addition, directional ablation, mean transport, angular steering and per-token
closed-loop feedback alike.
The ``controllens.camex`` subpackage merges mixture-of-experts layers, from
flat averaging to curvature-aware merging.
"""

from controllens.controllers import Gains, LayerController, control_signal
from controllens.data import (
    ContrastiveTexts,
    from_texts,
    load_caa,
    load_labelled_tsv,
    sst2_prompts,
)
from controllens.dynamics import (
    ErrorDynamics,
    StabilityWarning,
    check_gains,
    error_dynamics,
    plot_error_dynamics,
)
from controllens.errors import (
    ControllensError,
    DataError,
    HookPointError,
    LayerError,
    MergeError,
    MetadataMismatchError,
    ModelError,
    VectorError,
)
from controllens.hooks import steering_hooks
from controllens.interventions import steer
from controllens.models import DEFAULT_MODEL, load_bridge, load_hf, load_nnsight
from controllens.operators import Ablate, Add, Feedback, Operator, Rotate, Transport
from controllens.sequential import sequential_steering
from controllens.steering import METHODS, Composed, Positions, Steering, compose
from controllens.vectors import ContrastiveMeans, contrastive_means, mean_activations

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "Ablate",
    "Add",
    "Composed",
    "Feedback",
    "Operator",
    "Rotate",
    "Transport",
    "ContrastiveMeans",
    "ContrastiveTexts",
    "ControllensError",
    "DataError",
    "ErrorDynamics",
    "Gains",
    "HookPointError",
    "LayerController",
    "LayerError",
    "MergeError",
    "MetadataMismatchError",
    "ModelError",
    "Positions",
    "StabilityWarning",
    "Steering",
    "VectorError",
    "check_gains",
    "compose",
    "contrastive_means",
    "error_dynamics",
    "control_signal",
    "from_texts",
    "load_bridge",
    "load_caa",
    "load_hf",
    "load_labelled_tsv",
    "load_nnsight",
    "mean_activations",
    "plot_error_dynamics",
    "sequential_steering",
    "sst2_prompts",
    "steer",
    "steering_hooks",
]
