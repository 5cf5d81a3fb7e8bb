"""CAMEx: curvature-aware merging of experts (arXiv 2502.18821).

Merging functions over expert weights (:mod:`~controllens.camex.merging`), a
merged-experts layer with routers and hook points
(:mod:`~controllens.camex.layers`), upcycling of dense Hugging Face models
with Mixtral export (:mod:`~controllens.camex.upcycle`) and a fine-tuning loop
(:mod:`~controllens.camex.train`).
"""

from controllens.camex.layers import (
    ExpertChain,
    MergedExperts,
    MoEConfig,
    Router,
    choose_path,
    collect_aux_losses,
    moe_layers,
)
from controllens.camex.merging import (
    KroneckerCurvature,
    camex_merge,
    dare,
    ep_camex_merge,
    kronecker_sizes,
    smear_merge,
    stack_experts,
    task_vector_merge,
    task_vectors,
    ties_elect,
)
from controllens.camex.train import (
    TrainConfig,
    TrainResult,
    load_checkpoint,
    load_text,
    perplexity,
    save_checkpoint,
    train,
)
from controllens.camex.upcycle import UpcycleConfig, save_mixtral, to_mixtral, upcycle

__all__ = [
    "ExpertChain",
    "KroneckerCurvature",
    "MergedExperts",
    "MoEConfig",
    "Router",
    "TrainConfig",
    "TrainResult",
    "UpcycleConfig",
    "camex_merge",
    "choose_path",
    "collect_aux_losses",
    "dare",
    "ep_camex_merge",
    "kronecker_sizes",
    "load_checkpoint",
    "load_text",
    "moe_layers",
    "perplexity",
    "save_checkpoint",
    "save_mixtral",
    "smear_merge",
    "stack_experts",
    "task_vector_merge",
    "task_vectors",
    "ties_elect",
    "to_mixtral",
    "train",
    "upcycle",
]
