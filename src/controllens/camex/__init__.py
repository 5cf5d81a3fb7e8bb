"""CAMEx: curvature-aware merging of experts (arXiv 2502.18821).

Merging functions over expert weights (:mod:`~controllens.camex.merging`), a
merged-experts layer with routers and hook points
(:mod:`~controllens.camex.layers`), upcycling of dense Hugging Face models
with Mixtral export (:mod:`~controllens.camex.upcycle`) and a fine-tuning loop
(:mod:`~controllens.camex.train`), and merge analysis of hooked MoE models:
routing statistics, expert similarity, curvature estimates, merge probes and
merge plans (:mod:`~controllens.camex.analysis` and its siblings).
"""

from controllens.camex.analysis import (
    MoELayer,
    RoutingHooks,
    calibration_batches,
    find_moe_layers,
    token_windows,
)
from controllens.camex.curvature import ExpertCurvature, estimate_curvature
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
from controllens.camex.probes import (
    PROBE_METHODS,
    MergePlan,
    ProbeCost,
    ProbeReport,
    merge_group,
    merge_plan,
    merge_probe,
)
from controllens.camex.routing import RoutingStats, routing_stats
from controllens.camex.similarity import ExpertSimilarity, expert_similarity
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
    "PROBE_METHODS",
    "ExpertChain",
    "ExpertCurvature",
    "ExpertSimilarity",
    "MergePlan",
    "MoELayer",
    "ProbeCost",
    "ProbeReport",
    "RoutingHooks",
    "RoutingStats",
    "calibration_batches",
    "estimate_curvature",
    "expert_similarity",
    "find_moe_layers",
    "merge_group",
    "merge_plan",
    "merge_probe",
    "routing_stats",
    "token_windows",
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
