# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # From flat to curvature-aware merging of experts
#
# A mixture-of-experts (MoE) layer holds experts `E_1..E_N` and a router
# with scores `s_i`. Instead of running the chosen experts and mixing their
# outputs, a *merged-experts* layer builds one expert per routing group
# (a token, a sequence or a causal segment) by merging weights:
#
# - flat (SMEAR): `W = sum_i s_i W_i`
# - task vectors around a base expert `W_0`, `tau_i = W_i - W_0`:
#   `W = W_0 + alpha sum_i s_i tau_i`
# - CAMEx (arXiv 2502.18821): `W = W_0 + alpha sum_i s_i M_i(tau_i)`, where
#   `M_i` is a learned curvature operator, a sum of Kronecker products acting
#   on both sides of `tau_i`, initialised to the identity.
#
# This tutorial
#
# 1. merges the copies of one real SmolLM2 weight matrix flat and
#    curvature-aware, and counts what the curvature costs;
# 2. upcycles two layers of SmolLM2 to merged-experts layers (once flat, once
#    CAMEx) and checks that the upcycled model still computes what the dense
#    one did;
# 3. looks at the routing;
# 4. trains both for a few steps on Tiny Shakespeare, measuring loss, step
#    time and parameters.
#
# The settings are tiny so that it runs on a CPU in a few minutes: 2
# upcycled layers, 3 experts, 10 training steps of 2 x 64 tokens. The paper
# fine-tunes T5-base on GLUE and GPT-2 on WikiText for thousands of steps;
# nothing here says which merge is better, only how to run and measure them.

# %%
import copy
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from controllens.camex import (
    KroneckerCurvature,
    MoEConfig,
    TrainConfig,
    UpcycleConfig,
    camex_merge,
    load_text,
    moe_layers,
    perplexity,
    smear_merge,
    task_vector_merge,
    task_vectors,
    train,
    upcycle,
)
from controllens.models import load_hf

# one thread: on a shared 2-core machine two threads often run slower
torch.set_num_threads(1)
torch.manual_seed(0)
started = time.perf_counter()


def repo_root() -> Path:
    """The checkout this notebook lives in (the folder with pyproject.toml)."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here


# Tiny Shakespeare: $CONTROLLENS_DATA, else ../shared/data beside the checkout
DATA = Path(os.environ.get("CONTROLLENS_DATA") or repo_root().parent / "shared" / "data")
print(DATA)

# %% [markdown]
# ## 1. Merging one weight matrix
#
# Take the down projection of SmolLM2's last MLP (`[d_model, d_mlp]` =
# `[576, 1536]`) as the base expert, and make three experts from it with a
# little noise, as upcycling does.

# %%
dense, tokenizer = load_hf()  # the embedded SmolLM2-135M-Instruct
base = dense.model.layers[29].mlp.down_proj.weight.detach()
experts = torch.stack([base + 0.01 * base.std() * torch.randn_like(base)
                       for _ in range(3)])
taus = task_vectors(base, experts)
routing = torch.tensor([0.6, 0.3, 0.1])  # one routing group
print(tuple(experts.shape), "experts;", tuple(taus.shape), "task vectors")

# %% [markdown]
# With every `M_i` at its initial identity, CAMEx is the task-vector merge,
# and with `alpha = 1` and routing weights that sum to 1 that is the flat
# merge again:

# %%
curvature = KroneckerCurvature(n_experts=3, d_out=576, d_in=1536, rank=1)
flat = smear_merge(experts, routing)
tv = task_vector_merge(base, taus, routing, alpha=1.0)
cam = camex_merge(base, taus, routing, curvature, alpha=1.0)
print("flat vs task vectors:", (flat - tv).abs().max().item())
print("flat vs CAMEx at init:", (flat - cam).abs().max().item())

# %% [markdown]
# Training moves the factors away from the identity. Perturb them to see
# that `M_i` then reshapes each task vector on both sides, rather than just
# rescaling it:

# %%
with torch.no_grad():
    for factor in (curvature.P, curvature.U):
        factor.add_(0.05 * torch.randn_like(factor))
cam = camex_merge(base, taus, routing, curvature, alpha=1.0)
merged_tau = (cam - base).flatten()
flat_tau = (flat - base).flatten()
cosine = torch.nn.functional.cosine_similarity(merged_tau, flat_tau, dim=0)
print(f"cosine(flat merged task vector, CAMEx merged task vector) = {cosine:.3f}")

# %% [markdown]
# What the curvature costs in memory: a Kronecker-factored `M_i` stores four
# small square factors per term, `P (a x a)`, `Q (b x b)`, `U (c x c)`,
# `V (d x d)` with `a b = d_out` and `c d = d_in`; a diagonal Fisher (as in
# Fisher merging) stores one number per weight entry.

# %%
a, b, c, d = curvature.sizes
kron = sum(p.numel() for p in curvature.parameters()) // 3
print(f"factor sizes a={a} b={b} c={c} d={d}")
print(f"per expert: Kronecker curvature {kron:,} numbers, "
      f"diagonal Fisher {base.numel():,} numbers ({base.numel() / kron:.0f}x more)")

# %% [markdown]
# ## 2. Upcycling SmolLM2
#
# `upcycle` replaces the MLPs of chosen decoder layers, in place, by
# `MergedExperts` layers whose experts (and base) are copies of the dense MLP
# with a little noise. The router starts at zero, so routing starts uniform.
# We build two models from the same dense weights:
#
# - **flat**: SMEAR over 4 expert slots;
# - **CAMEx**: one slot is the base, the router chooses among the other 3,
#   merged through Kronecker curvature.
#
# Both route causal segments of 32 tokens (Lory): a segment is merged with
# the routing weights of the previous one, so no token sees its future.

# %%
LAYERS = (28, 29)
segments = dict(granularity="segment", segment_length=32)
configs = {
    "flat": MoEConfig(n_experts=4, method="smear", **segments),
    "CAMEx": MoEConfig(n_experts=3, method="camex", curvature_rank=1, **segments),
}
models = {}
for name, config in configs.items():
    model = copy.deepcopy(dense)
    upcycle(model, UpcycleConfig(layers=LAYERS, moe=config, noise_std=0.01, seed=0))
    models[name] = model
print([n for n, _ in moe_layers(models["CAMEx"])])

# %% [markdown]
# Does the upcycled model still compute what the dense model did? Compare
# validation perplexity on the last 10% of Tiny Shakespeare (a few batches
# only).

# %%
train_ids, val_ids = load_text(DATA / "tinyshakespeare" / "input.txt", tokenizer)
EVAL = dict(seq_len=64, batch_size=4, max_batches=4)
before = {"dense": perplexity(dense, val_ids, **EVAL)}
for name, model in models.items():
    before[name] = perplexity(model, val_ids, **EVAL)
print({k: round(v, 2) for k, v in before.items()})

# %% [markdown]
# ## 3. Routing
#
# Each `MergedExperts` layer has TransformerLens hook points:
# `hook_router_logits`, `hook_routing_weights` (editable), `hook_aux_loss` and
# `hook_merged_output`. Read the routing weights of every segment of a few
# validation windows:

# %%
def routing_weights(model, n_windows=8):
    """Routing weights per layer: [windows * segments, expert]."""
    seen, handles = {}, []
    for name, layer in moe_layers(model):
        def keep(_module, _args, output, name=name):
            seen[name] = output.detach().flatten(0, 1)
        handles.append(layer.hook_routing_weights.register_forward_hook(keep))
    windows = val_ids[: n_windows * 64].reshape(n_windows, 64)
    try:
        with torch.no_grad():
            model(input_ids=windows)
    finally:
        for handle in handles:
            handle.remove()
    return seen


routing_before = routing_weights(models["CAMEx"])
for name, w in routing_before.items():
    print(name, "mean weight per expert:", w.mean(0).numpy().round(3))

# %% [markdown]
# Uniform, as promised: the router has not learnt anything yet.
#
# ## 4. A few training steps
#
# `train` fine-tunes on random windows of the token stream with AdamW, adding
# the layers' load-balancing losses. Only the MLPs of the upcycled layers are
# trained here (`train_layers`), which keeps the backward pass short.

# %%
STEPS = 10
train_config = TrainConfig(steps=STEPS, batch_size=2, seq_len=64, lr=1e-4,
                           train_layers=LAYERS, eval_batches=4, progress=False)
runs = {}
for name, model in models.items():
    runs[name] = train(model, train_ids, val_ids, train_config)
    steps = runs[name].step_times[1:]  # the first step includes warm-up
    print(f"{name:>5}: loss {runs[name].losses[0]:.2f} -> {runs[name].losses[-1]:.2f}, "
          f"val perplexity {runs[name].val_perplexity[-1][1]:.2f}, "
          f"{sum(steps) / len(steps):.2f} s/step")

# %%
def n_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters()
               if p.requires_grad or not trainable)


fig, ax = plt.subplots(figsize=(6, 3.5))
for name, run in runs.items():
    ax.plot(range(1, STEPS + 1), run.losses, marker=".", label=name)
ax.set(xlabel="step", ylabel="training loss (nats/token)",
       title="fine-tuning the upcycled layers")
ax.legend()
plt.show()

rows = [("dense", n_params(dense), None)] + [
    (name, n_params(model), sum(runs[name].step_times[1:]) / (STEPS - 1))
    for name, model in models.items()
]
for name, params, step in rows:
    step_text = "" if step is None else f", {step:.2f} s per step"
    print(f"{name:>5}: {params / 1e6:.2f}M parameters{step_text}")

# %% [markdown]
# The curvature factors add few parameters, but applying them to every task
# vector at every step costs time: that is the price of CAMEx against flat
# merging on a CPU. Ten steps cannot tell which merge trains better; the
# `benchmarks/camex_finetune.py` script of the repository runs longer
# comparisons.
#
# Finally, the routing after training: the router has started to prefer some
# experts for some segments.

# %%
routing_after = routing_weights(models["CAMEx"])
fig, axes = plt.subplots(1, len(routing_after), figsize=(10, 3), sharey=True)
for ax, (name, w) in zip(axes, routing_after.items()):
    ax.boxplot([w[:, e].numpy() for e in range(w.shape[1])])
    ax.axhline(1 / w.shape[1], color="grey", lw=0.8)
    ax.set(title=name, xlabel="expert", ylabel="routing weight per segment")
plt.tight_layout()
plt.show()

# %%
print(f"tutorial ran in {time.perf_counter() - started:.0f} s")
