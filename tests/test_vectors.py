import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from controllens.data import from_texts, load_labelled_tsv
from controllens.errors import (
    DataError,
    HookPointError,
    LayerError,
    MetadataMismatchError,
    ModelError,
    VectorError,
)
from controllens.testing import tiny_llama, tiny_tokenizer
from controllens.vectors import ContrastiveMeans, contrastive_means
from tests.conftest import data_path

TARGET = ("a joy to watch", "good", "the best film of the year, truly", "fun!")
SOURCE = ("a chore", "dull and long-winded, a real mess", "bad bad", "meh.")
DATA_TINY = from_texts(TARGET, SOURCE)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def models(tiny_hf, tiny_bridge, tiny_nnsight):
    return {"hf": tiny_hf, "bridge": tiny_bridge, "nnsight": tiny_nnsight}


def means_of(model, tok, **kwargs):
    kwargs.setdefault("progress", False)
    return contrastive_means(model, DATA_TINY, tokenizer=tok, **kwargs)


def hidden_states(model, tok, text):
    """Per-layer residual streams of one unpadded text: index l is resid_pre of l."""
    ids = tok([text], return_tensors="pt")
    with torch.inference_mode():
        out = model(**ids, output_hidden_states=True)
    # HF applies the final norm to its last hidden state; layers below it are raw
    return [h[0].double() for h in out.hidden_states[:-1]]


def by_hand(model, tok, texts, layer, aggregation):
    rows = []
    for text in texts:
        h = hidden_states(model, tok, text)[layer]
        rows.append(h[-1] if aggregation == "last" else h[1:].mean(dim=0))
    return torch.stack(rows).mean(dim=0)


def toy_means(**changes):
    fields = dict(
        mu_target=torch.arange(12.0).reshape(3, 4),
        mu_source=torch.ones(3, 4),
        layers=(0, 2, 5),
        hook_point="resid_post",
        aggregation="mean",
        model_name="tiny-llama",
        n_layers=6,
        d_model=4,
        n_target=10,
        n_source=12,
    )
    fields.update(changes)
    return ContrastiveMeans(**fields)


# extraction


@pytest.mark.parametrize("aggregation", ["mean", "last"])
@pytest.mark.parametrize("hook_point", ["resid_pre", "resid_post"])
def test_means_match_a_hand_computation_on_unpadded_texts(
    tiny_hf, tok, aggregation, hook_point
):
    means = means_of(
        tiny_hf, tok, aggregation=aggregation, hook_point=hook_point, batch_size=3
    )
    for row, layer in enumerate(means.layers[:2]):
        index = layer if hook_point == "resid_pre" else layer + 1
        for texts, mu in ((TARGET, means.mu_target), (SOURCE, means.mu_source)):
            expected = by_hand(tiny_hf, tok, texts, index, aggregation)
            torch.testing.assert_close(mu[row].double(), expected, rtol=1e-5, atol=1e-6)


def test_mean_leaves_out_the_first_token_and_the_padding(tiny_hf, tok):
    text_long, text_short = "abcdef", "xy"
    means = contrastive_means(
        tiny_hf, target=[text_long, text_short], source=["zz"], tokenizer=tok,
        layers=[1], hook_point="resid_pre", batch_size=2, progress=False,
    )  # fmt: skip
    # "xy" is <s> x y: only x and y count, and none of the 4 pads of its row
    long_rows = hidden_states(tiny_hf, tok, text_long)[1]
    short_rows = hidden_states(tiny_hf, tok, text_short)[1]
    assert short_rows.shape[0] == 3
    expected = (long_rows[1:].mean(0) + short_rows[1:].mean(0)) / 2
    torch.testing.assert_close(
        means.mu_target[0].double(), expected, rtol=1e-5, atol=1e-6
    )
    with_first = (long_rows.mean(0) + short_rows.mean(0)) / 2
    assert not torch.allclose(means.mu_target[0].double(), with_first, atol=1e-4)


def test_last_reads_the_last_real_token_under_left_and_right_padding(tiny_hf, tok):
    expected = by_hand(tiny_hf, tok, TARGET, 2, "last")
    for side in ("left", "right"):
        means = means_of(
            tiny_hf, tok, aggregation="last", hook_point="resid_pre",
            layers=[2], batch_size=4, padding_side=side,
        )  # fmt: skip
        torch.testing.assert_close(
            means.mu_target[0].double(), expected, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("kind", ["hf", "bridge", "nnsight"])
@pytest.mark.parametrize("aggregation", ["mean", "last"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_means_equal_batch_size_one_under_padding(
    models, tok, kind, aggregation, padding_side
):
    model = models[kind]
    single = means_of(model, tok, aggregation=aggregation, batch_size=1)
    batched = means_of(
        model, tok, aggregation=aggregation, batch_size=3, padding_side=padding_side
    )
    torch.testing.assert_close(
        batched.mu_target, single.mu_target, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        batched.mu_source, single.mu_source, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("hook_point", ["resid_pre", "resid_post"])
def test_bridge_nnsight_and_hf_means_agree(models, tok, hook_point):
    reference = means_of(models["hf"], tok, hook_point=hook_point)
    for kind in ("bridge", "nnsight"):
        other = means_of(models[kind], tok, hook_point=hook_point)
        torch.testing.assert_close(other.r, reference.r, rtol=1e-5, atol=1e-6)
        assert other.layers == reference.layers == (0, 1, 2)


def test_resid_pre_of_a_layer_is_resid_post_of_the_layer_before(tiny_hf, tok):
    pre = means_of(tiny_hf, tok, hook_point="resid_pre", layers=[2])
    post = means_of(tiny_hf, tok, hook_point="resid_post", layers=[1])
    torch.testing.assert_close(pre.mu_target, post.mu_target)


def test_means_record_what_was_measured(tiny_hf, tok):
    means = means_of(tiny_hf, tok, layers=[-1, 0], aggregation="last")
    assert means.layers == (0, 2)
    assert (means.n_layers, means.d_model) == (3, 32)
    assert (means.n_target, means.n_source) == (4, 4)
    assert means.model_name == "tiny-llama"
    assert means.mu_target.dtype == torch.float32
    assert means.mu_target.device.type == "cpu"


def test_target_and_source_keywords_equal_a_data_object(tiny_hf, tok):
    a = means_of(tiny_hf, tok, layers=[1])
    b = contrastive_means(
        tiny_hf, target=TARGET, source=SOURCE, tokenizer=tok, layers=[1], progress=False
    )
    torch.testing.assert_close(a.r, b.r, rtol=0, atol=0)


def test_max_length_truncates_every_text(tiny_hf, tok):
    truncated = means_of(tiny_hf, tok, max_length=4, layers=[0])
    # the tokenizer adds <s>, so 4 tokens are <s> plus 3 characters
    short = from_texts([t[:3] for t in TARGET], [t[:3] for t in SOURCE])
    expected = contrastive_means(
        tiny_hf, short, tokenizer=tok, layers=[0], progress=False
    )
    torch.testing.assert_close(truncated.r, expected.r, rtol=1e-5, atol=1e-6)


def test_chat_template_wraps_texts_as_a_user_turn(tiny_hf):
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    wrapped = means_of(tiny_hf, tok, chat_template=True, aggregation="last")
    by_text = contrastive_means(
        tiny_hf,
        target=[f"[user]{t}[assistant]" for t in TARGET],
        source=[f"[user]{s}[assistant]" for s in SOURCE],
        tokenizer=tok,
        aggregation="last",
        progress=False,
    )
    # one <s>: the template's, not a second one from the tokenizer
    torch.testing.assert_close(wrapped.r, by_text.r, rtol=1e-5, atol=1e-6)


def test_progress_bar_can_be_switched_off(tiny_hf, tok, capsys):
    means_of(tiny_hf, tok, progress=False, layers=[0])
    assert capsys.readouterr().err == ""
    means_of(tiny_hf, tok, progress=True, layers=[0])
    assert "contrastive means" in capsys.readouterr().err


def test_hooks_are_removed_even_when_the_forward_raises(tiny_hf, tok):
    layer = tiny_hf.model.layers[0]
    before = [
        (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in tiny_hf.modules()
    ]

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = layer.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            means_of(tiny_hf, tok, layers=[1])
    finally:
        handle.remove()
    after = [
        (len(m._forward_hooks), len(m._forward_pre_hooks)) for m in tiny_hf.modules()
    ]
    assert after == before


# bad input to contrastive_means


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target=["good"], source=[]), DataError, "at least one source"),
        (dict(target=["good"]), DataError, "no source"),
        (dict(data=DATA_TINY, target=["x"]), DataError, "got both"),
        (dict(data=DATA_TINY, layers=[3]), LayerError, r"use 0\.\.2"),
        (dict(data=DATA_TINY, layers=[-4]), LayerError, "outside the model"),
        (dict(data=DATA_TINY, hook_point="mlp_out"), HookPointError, "resid_post"),
        (dict(data=DATA_TINY, aggregation="max"), ValueError, "aggregation in"),
        (dict(data=DATA_TINY, batch_size=0), ValueError, "positive integer"),
        (dict(data=DATA_TINY, padding_side="up"), ValueError, "'left' or 'right'"),
        (dict(data=DATA_TINY, max_length=1), ValueError, "max_length >= 2"),
        (
            dict(target=["ok", "x"], source=["bad"], prepend_bos=False),
            DataError,
            "target text 1 .*single token",
        ),
    ],
    ids=[
        "one-sided",
        "no-source",
        "data-and-texts",
        "layer-too-deep",
        "negative-too-far",
        "hook-point",
        "aggregation",
        "batch-size",
        "padding-side",
        "max-length",
        "single-token-mean",
    ],
)
def test_bad_input_is_refused_with_a_clear_error(tiny_hf, tok, kwargs, error, match):
    with pytest.raises(error, match=match):
        contrastive_means(tiny_hf, tokenizer=tok, progress=False, **kwargs)


def test_a_single_token_text_is_fine_with_last(tiny_hf, tok):
    means = contrastive_means(
        tiny_hf, target=["x"], source=["y"], tokenizer=tok, aggregation="last",
        prepend_bos=False, progress=False,
    )  # fmt: skip
    assert means.n_target == 1


def test_an_unknown_model_is_refused(tok):
    with pytest.raises(ModelError, match="Expected a TransformerBridge"):
        contrastive_means(torch.nn.Linear(2, 2), DATA_TINY, tokenizer=tok)
    with pytest.raises(ModelError, match="Expected a TransformerBridge"):
        contrastive_means(object(), DATA_TINY, tokenizer=tok)


def test_a_plain_hf_model_needs_a_tokenizer(tiny_hf):
    with pytest.raises(ModelError, match="pass tokenizer="):
        contrastive_means(tiny_hf, DATA_TINY, progress=False)


# the ContrastiveMeans object


def test_r_is_target_minus_source_and_error_counts_from_the_end():
    means = toy_means()
    torch.testing.assert_close(means.r, means.mu_target - 1)
    torch.testing.assert_close(means.error(-1), means.r[2])
    torch.testing.assert_close(means.error(2), means.r[1])


def test_error_at_an_unmeasured_layer_names_the_measured_ones():
    with pytest.raises(LayerError, match=r"cover layers \(0, 2, 5\)"):
        toy_means().error(3)
    with pytest.raises(LayerError, match=r"use 0\.\.5"):
        toy_means().error(6)


def test_means_keep_their_own_copy_of_the_tensors():
    mu = torch.zeros(3, 4)
    means = toy_means(mu_target=mu)
    mu += 1
    means.error(0).add_(5)
    assert means.mu_target.abs().sum() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_means_are_refused_naming_the_layers(bad):
    mu = torch.zeros(3, 4)
    mu[1, 2] = bad
    with pytest.raises(VectorError, match=r"mu_source.*layers \[2\]"):
        toy_means(mu_source=mu)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(layers=(0, 2)), VectorError, r"shape \(layer, d_model\) = \(2, 4\)"),
        (dict(d_model=5), VectorError, r"= \(3, 5\)"),
        (dict(layers=(5, 2, 0)), LayerError, "unique and ascending"),
        (dict(layers=(0, 2, 6)), LayerError, r"0\.\.5"),
        (dict(hook_point="attn_out"), HookPointError, "resid_pre"),
        (dict(aggregation="max"), ValueError, "aggregation"),
        (dict(n_source=0), DataError, "n_source"),
    ],
    ids=["rows", "width", "order", "range", "hook-point", "aggregation", "count"],
)
def test_inconsistent_means_are_refused(changes, error, match):
    with pytest.raises(error, match=match):
        toy_means(**changes)


def test_save_and_load_round_trip(tmp_path):
    means = toy_means()
    path = means.save(tmp_path / "means.safetensors")
    loaded = ContrastiveMeans.load(path)
    torch.testing.assert_close(loaded.mu_target, means.mu_target, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mu_source, means.mu_source, rtol=0, atol=0)
    assert loaded.metadata() == means.metadata()
    # the metadata lives in the safetensors header, as JSON strings
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["layers"] == "[0, 2, 5]"
        assert f.metadata()["hook_point"] == '"resid_post"'


def test_saved_means_load_for_their_own_model(tiny_hf, tok, tmp_path):
    means = means_of(tiny_hf, tok, layers=[1])
    path = means.save(tmp_path / "m.safetensors")
    loaded = ContrastiveMeans.load(path, tiny_hf, hook_point="resid_post")
    torch.testing.assert_close(loaded.r, means.r, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model_kwargs", "hook_point", "match"),
    [
        (dict(d_model=16), None, "d_model 32 vs 16"),
        (dict(n_layers=4), None, "n_layers 3 vs 4"),
        (dict(), "resid_pre", "hook point 'resid_post' vs 'resid_pre'"),
    ],
    ids=["width", "depth", "hook-point"],
)
def test_loading_for_another_model_is_refused(
    tiny_hf, tok, tmp_path, model_kwargs, hook_point, match
):
    path = means_of(tiny_hf, tok, layers=[0]).save(tmp_path / "m.safetensors")
    with pytest.raises(MetadataMismatchError, match=match):
        ContrastiveMeans.load(path, tiny_llama(**model_kwargs), hook_point=hook_point)


def test_loading_for_a_model_of_another_name_is_refused(tiny_hf, tmp_path):
    path = toy_means(n_layers=3, d_model=32, layers=(0,), mu_target=torch.zeros(1, 32),
                     mu_source=torch.ones(1, 32), model_name="gpt2").save(
        tmp_path / "m.safetensors")  # fmt: skip
    with pytest.raises(MetadataMismatchError, match="model 'gpt2' vs 'tiny-llama'"):
        ContrastiveMeans.load(path, tiny_hf)


def test_a_safetensors_file_of_something_else_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(MetadataMismatchError, match="written by ContrastiveMeans.save"):
        ContrastiveMeans.load(path)


# the real model


@pytest.fixture(scope="module")
def smol_hf_eager():
    from controllens.models import load_hf

    model, tokenizer = load_hf()
    model.set_attn_implementation("eager")
    return model, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["mean", "last"])
def test_bridge_and_hf_means_agree_on_smollm2(
    smol_bridge, smol_hf, smol_hf_eager, aggregation
):
    path = data_path("sst2", "train_sample.tsv")
    data = load_labelled_tsv(path, limit=4)
    kwargs = dict(aggregation=aggregation, batch_size=4, progress=False)
    from_bridge = contrastive_means(smol_bridge, data, **kwargs)
    for hf, tokenizer in (smol_hf, smol_hf_eager):
        from_hf = contrastive_means(hf, data, tokenizer=tokenizer, **kwargs)
        assert from_hf.model_name == from_bridge.model_name == "SmolLM2-135M-Instruct"
        for name in ("mu_target", "mu_source"):
            ours, theirs = getattr(from_bridge, name), getattr(from_hf, name)
            # the bridge runs eager attention: identical to eager HF; against
            # HF's default SDPA kernel the gap is float32 rounding (measured
            # 1.4e-4 at layer 29, whose entries reach ~550)
            scale = theirs.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
            assert ((ours - theirs).abs() / scale).max() < 1e-6
            if hf is smol_hf_eager[0]:
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_a_file_with_incomplete_metadata_is_refused(tmp_path):
    path = tmp_path / "broken.safetensors"
    tensors = {"mu_target": torch.zeros(1, 4), "mu_source": torch.zeros(1, 4)}
    save_file(
        tensors, str(path), metadata={"format": "controllens.contrastive_means/1"}
    )
    with pytest.raises(MetadataMismatchError, match="not a valid file"):
        ContrastiveMeans.load(path)


def test_p_with_unit_strength_closes_the_error_at_the_steered_layer(tiny_bridge):
    from controllens.steering import Steering
    from controllens.vectors import mean_activations

    target, source = ["so good and fine", "lovely day"], ["bad one", "awful film"]
    means = contrastive_means(tiny_bridge, target=target, source=source, progress=False)
    steering = Steering.from_means(means, layers=[1], alpha=1.0)
    with steering.apply(tiny_bridge):
        steered = mean_activations(tiny_bridge, source, layers=[1], progress=False)
    torch.testing.assert_close(steered[0], means.mu_target[1], atol=1e-5, rtol=1e-5)


def test_mean_activations_refuses_an_empty_list(tiny_bridge):
    from controllens.vectors import mean_activations

    with pytest.raises(DataError, match="non-empty list"):
        mean_activations(tiny_bridge, [], progress=False)


@pytest.mark.parametrize("content", ["garbage", "", "pickle"], ids=str)
def test_a_file_that_is_not_saved_means_is_refused_and_never_executed(
    tmp_path, content
):
    import pickle

    marker = tmp_path / "executed"
    path = tmp_path / "means.safetensors"
    if content == "pickle":

        class Payload:
            def __reduce__(self):
                return (marker.write_text, ("pwned",))

        path.write_bytes(pickle.dumps(Payload()))
    else:
        path.write_text(content)
    with pytest.raises(MetadataMismatchError, match="ContrastiveMeans.save"):
        ContrastiveMeans.load(path)
    assert not marker.exists()


# moments: variances and principal axes, measured in the same pass

MORE_TARGET = (*TARGET, "lovely, lovely", "so very good indeed")


def per_text_vectors(model, tok, texts, aggregation):
    """[layer, text, d_model] resid_pre vectors, one unpadded text at a time."""
    rows = []
    for text in texts:
        hidden = hidden_states(model, tok, text)
        rows.append(
            torch.stack([h[-1] if aggregation == "last" else h[1:].mean(0)
                         for h in hidden])
        )  # fmt: skip
    return torch.stack(rows, dim=1)


def first_singular_vector(rows, r):
    """Top right singular vector of each layer's [n, d_model] rows, signed along r."""
    axis = torch.linalg.svd(rows, full_matrices=False).Vh[:, 0]
    return axis * (axis * r).sum(-1, keepdim=True).sign()


def brute_moments(model, tok, target, source, aggregation):
    x_t = per_text_vectors(model, tok, target, aggregation)
    x_s = per_text_vectors(model, tok, source, aggregation)
    r = x_t.mean(1) - x_s.mean(1)
    pooled = torch.cat([x_t, x_s], dim=1)
    pairs = min(len(target), len(source))
    return {
        "var_target": x_t.var(dim=1, unbiased=False),
        "var_source": x_s.var(dim=1, unbiased=False),
        "axis_pooled": first_singular_vector(pooled - pooled.mean(1, keepdim=True), r),
        "axis_paired": first_singular_vector(x_t[:, :pairs] - x_s[:, :pairs], r),
    }


def moments_of(model, tok, target=TARGET, source=SOURCE, **kwargs):
    kwargs = dict(hook_point="resid_pre", progress=False, moments=True) | kwargs
    return contrastive_means(
        model, target=target, source=source, tokenizer=tok, **kwargs
    )


@pytest.mark.parametrize("aggregation", ["mean", "last"])
@pytest.mark.parametrize(
    ("target", "source"),
    [(TARGET, SOURCE), (MORE_TARGET, SOURCE), (SOURCE, MORE_TARGET)],
    ids=["equal", "more-target", "more-source"],
)
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_moments_match_a_brute_force_computation_from_per_text_vectors(
    tiny_hf, tok, aggregation, target, source, batch_size
):
    means = moments_of(
        tiny_hf, tok, target, source, aggregation=aggregation, batch_size=batch_size
    )
    expected = brute_moments(tiny_hf, tok, target, source, aggregation)
    for name, value in expected.items():
        ours = getattr(means, name)
        assert ours.dtype == torch.float32 and ours.shape == (3, 32), name
        torch.testing.assert_close(ours.double(), value, rtol=1e-4, atol=1e-5, msg=name)


def test_pairs_are_index_aligned_and_stop_at_the_shorter_side(tiny_hf, tok):
    # the two extra target texts have no partner: dropping them changes nothing
    more = moments_of(tiny_hf, tok, MORE_TARGET, SOURCE, batch_size=3)
    equal = moments_of(tiny_hf, tok, TARGET, SOURCE, batch_size=3)
    torch.testing.assert_close(more.axis_paired, equal.axis_paired)
    # pairing target i with source i + 1 instead gives another axis
    rolled = moments_of(tiny_hf, tok, TARGET, SOURCE[1:] + SOURCE[:1], batch_size=3)
    assert (rolled.axis_paired - equal.axis_paired).abs().max() > 1e-2
    # ... while the pooled statistics ignore the order of the texts
    torch.testing.assert_close(rolled.axis_pooled, equal.axis_pooled)
    torch.testing.assert_close(rolled.var_source, equal.var_source)


def test_paired_axis_ignores_which_side_of_a_pair_is_which(tiny_hf, tok):
    # uncentred (RepE): swapping target[i] and source[i] flips d_i, not d_i d_i^T
    swapped_target = (SOURCE[0], TARGET[1], SOURCE[2], TARGET[3])
    swapped_source = (TARGET[0], SOURCE[1], TARGET[2], SOURCE[3])
    means = moments_of(tiny_hf, tok, batch_size=1)
    swapped = moments_of(tiny_hf, tok, swapped_target, swapped_source, batch_size=1)
    cosine = (means.axis_paired * swapped.axis_paired).sum(-1).abs()
    torch.testing.assert_close(cosine, torch.ones(3))
    assert (swapped.r - means.r).abs().max() > 1e-2


def test_moments_leave_the_means_bit_identical(tiny_hf, tok):
    from controllens.vectors import mean_activations

    kwargs = dict(aggregation="mean", batch_size=3, layers=[0, 2])
    plain = means_of(tiny_hf, tok, **kwargs)
    with_moments = means_of(tiny_hf, tok, moments=True, **kwargs)
    for name in ("mu_target", "mu_source"):
        assert torch.equal(getattr(plain, name), getattr(with_moments, name))
    # and equal to one side measured on its own, as before the sides alternated
    alone = mean_activations(tiny_hf, SOURCE, tokenizer=tok, progress=False, **kwargs)
    assert torch.equal(plain.mu_source, alone)
    assert plain.var_target is plain.axis_pooled is plain.axis_paired is None
    assert not plain.has_moments and with_moments.has_moments


def test_axes_are_unit_and_signed_along_r(tiny_hf, tok):
    means = moments_of(tiny_hf, tok, MORE_TARGET, SOURCE, aggregation="last")
    for name in ("axis_pooled", "axis_paired"):
        axis = getattr(means, name)
        torch.testing.assert_close(axis.norm(dim=-1), torch.ones(3))
        assert ((axis * means.r).sum(-1) > 0).all(), name


def test_one_text_per_side_gives_zero_variance_and_axes_along_r(tiny_hf, tok):
    means = moments_of(tiny_hf, tok, ["so good"], ["so bad"], hook_point="resid_post")
    assert means.var_target.abs().max() == 0 and means.var_source.abs().max() == 0
    # one pair, and two pooled texts: both axes are r / |r|
    direction = means.r / means.r.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(means.axis_paired, direction, rtol=0, atol=1e-5)
    torch.testing.assert_close(means.axis_pooled, direction, rtol=0, atol=1e-5)


def test_identical_sides_warn_that_the_paired_axis_is_arbitrary(tiny_hf, tok):
    with pytest.warns(UserWarning, match=r"axis_paired is not unique at layers"):
        means = moments_of(tiny_hf, tok, TARGET, TARGET, batch_size=2)
    assert means.r.abs().max() == 0
    # still a unit vector, its largest entry positive (r gives no sign)
    axis = means.axis_paired
    torch.testing.assert_close(axis.norm(dim=-1), torch.ones(3))
    largest = axis.gather(-1, axis.abs().argmax(-1, keepdim=True))
    assert (largest > 0).all()


def test_pca_r_is_r_projected_on_the_paired_axis(tiny_hf, tok):
    means = moments_of(tiny_hf, tok, aggregation="last")
    axis = means.axis_paired.double()
    r = means.r.double()
    expected = torch.stack([(a @ v) * a for a, v in zip(axis, r, strict=True)])
    torch.testing.assert_close(means.pca_r.double(), expected, rtol=1e-5, atol=1e-6)
    # the projection never exceeds r, and it is along r's side of the axis
    assert (means.pca_r.norm(dim=-1) <= means.r.norm(dim=-1) * (1 + 1e-6)).all()
    assert ((means.pca_r * means.r).sum(-1) >= 0).all()


def test_pca_r_without_moments_says_how_to_get_them(tiny_hf, tok):
    means = means_of(tiny_hf, tok, layers=[0])
    with pytest.raises(VectorError, match=r"contrastive_means\(\.\.\., moments=Tr"):
        _ = means.pca_r


@pytest.mark.parametrize("kind", ["bridge", "nnsight"])
@pytest.mark.parametrize("aggregation", ["mean", "last"])
def test_bridge_nnsight_and_hf_moments_agree(models, tok, kind, aggregation):
    kwargs = dict(aggregation=aggregation, batch_size=3, hook_point="resid_post")
    reference = moments_of(models["hf"], tok, MORE_TARGET, SOURCE, **kwargs)
    other = moments_of(models[kind], None, MORE_TARGET, SOURCE, **kwargs)
    for name in ("var_target", "var_source", "axis_pooled", "axis_paired"):
        torch.testing.assert_close(
            getattr(other, name), getattr(reference, name), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target=["good"], source=[]), DataError, "at least one source"),
        (dict(target=[], source=["bad"]), DataError, "at least one target"),
        (dict(target=["good"]), DataError, "no source"),
        (
            dict(target=["ok", "fine"], source=["bad", "x"], prepend_bos=False),
            DataError,
            "source text 1 .*single token",
        ),
    ],
    ids=["no-source", "no-target", "source-missing", "single-token"],
)
def test_bad_input_with_moments_is_refused_as_clearly(
    tiny_hf, tok, kwargs, error, match
):
    kwargs = dict(moments=True) | kwargs
    with pytest.raises(error, match=match):
        contrastive_means(tiny_hf, tokenizer=tok, progress=False, **kwargs)


def toy_moments(**changes):
    axis = torch.zeros(3, 4)
    axis[:, 0] = 1.0
    fields = dict(
        var_target=torch.ones(3, 4),
        var_source=torch.full((3, 4), 2.0),
        axis_pooled=axis,
        axis_paired=axis.roll(1, dims=1),
    )
    return toy_means(**(fields | changes))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(var_target=-torch.ones(3, 4)), r"var_target to hold variances >= 0"),
        (dict(axis_pooled=torch.ones(3, 4)), r"axis_pooled to hold unit rows"),
        (
            dict(var_source=torch.tensor([[0.0] * 4, [float("nan")] * 4, [0.0] * 4])),
            r"finite values in var_source.*layers \[2\]",
        ),
        (dict(layers=(0, 2)), r"shape \(layer, d_model\) = \(2, 4\)"),
    ],
    ids=["negative-variance", "axis-not-unit", "nan", "rows"],
)
def test_inconsistent_moments_are_refused(changes, match):
    with pytest.raises(VectorError, match=match):
        toy_moments(**changes)


def test_save_and_load_round_trip_with_moments(tmp_path):
    means = toy_moments()
    path = means.save(tmp_path / "means.safetensors")
    loaded = ContrastiveMeans.load(path)
    for name in ("mu_target", "var_target", "var_source", "axis_pooled",
                 "axis_paired"):  # fmt: skip
        assert torch.equal(getattr(loaded, name), getattr(means, name)), name
    assert loaded.metadata() == means.metadata()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "controllens.contrastive_means/2"


def test_saved_measured_moments_load_for_their_model(tiny_hf, tok, tmp_path):
    means = moments_of(tiny_hf, tok, layers=[1, 2])
    loaded = ContrastiveMeans.load(means.save(tmp_path / "m.safetensors"), tiny_hf)
    assert torch.equal(loaded.pca_r, means.pca_r)
    assert torch.equal(loaded.var_source, means.var_source)


def test_means_without_moments_keep_the_first_file_format(tmp_path):
    path = toy_means().save(tmp_path / "means.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "controllens.contrastive_means/1"
        assert set(f.keys()) == {"mu_target", "mu_source"}
    loaded = ContrastiveMeans.load(path)
    assert not loaded.has_moments and loaded.axis_paired is None


def test_a_file_of_an_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    means = toy_means()
    header = {key: json.dumps(value) for key, value in means.metadata().items()}
    header["format"] = "controllens.contrastive_means/3"
    save_file({"mu_target": means.mu_target, "mu_source": means.mu_source},
              str(path), metadata=header)  # fmt: skip
    with pytest.raises(MetadataMismatchError, match="got format '.*/3'"):
        ContrastiveMeans.load(path)


@pytest.mark.slow
def test_moments_match_per_text_vectors_on_smollm2(smol_hf):
    model, tokenizer = smol_hf
    data = load_labelled_tsv(data_path("sst2", "train_sample.tsv"), limit=20)
    means = contrastive_means(
        model, data, tokenizer=tokenizer, layers=[15], hook_point="resid_pre",
        moments=True, batch_size=8, progress=False,
    )  # fmt: skip
    x_t, x_s = (
        per_text_vectors(model, tokenizer, texts, "mean")[15:16]
        for texts in (data.target, data.source)
    )
    r = x_t.mean(1) - x_s.mean(1)
    pooled = torch.cat([x_t, x_s], dim=1)
    torch.testing.assert_close(
        means.var_target.double(), x_t.var(1, unbiased=False), rtol=1e-3, atol=1e-3
    )
    # batched SDPA against one text at a time: ~1e-4 of entries of ~200
    expected = first_singular_vector(pooled - pooled.mean(1, keepdim=True), r)
    torch.testing.assert_close(means.axis_pooled.double(), expected, rtol=0, atol=1e-3)
    expected = first_singular_vector(x_t - x_s, r)
    torch.testing.assert_close(means.axis_paired.double(), expected, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_paired_axis_of_caa_pairs_is_the_answer_letter_axis_on_smollm2(smol_hf):
    from controllens.data import load_caa

    # the uncentred paired moment is blind to the sign of each difference, and
    # every CAA difference at the answer letter carries +-(x_A - x_B): the
    # letter axis, not the behaviour (|x_A - x_B| ~ 100 vs |r| ~ 5-12 measured)
    model, tokenizer = smol_hf
    path = data_path("caa", "generate", "refusal", "generate_dataset.json")
    caa = load_caa(path)
    a_first = [
        item["answer_matching_behavior"].strip().startswith("(A")
        for item in json.loads(path.read_text())[:40]
    ]
    pairs = list(zip(caa.target[:40], caa.source[:40], strict=True))
    kwargs = dict(tokenizer=tokenizer, aggregation="last", layers=range(5, 21))
    behaviour = contrastive_means(
        model, from_texts(*zip(*pairs, strict=True)), moments=True,
        progress=False, **kwargs,
    )  # fmt: skip
    by_letter = [
        (t, s) if a else (s, t) for (t, s), a in zip(pairs, a_first, strict=True)
    ]
    letter = contrastive_means(
        model, from_texts(*zip(*by_letter, strict=True)), progress=False, **kwargs
    )
    direction = letter.r / letter.r.norm(dim=-1, keepdim=True)
    assert ((behaviour.axis_paired * direction).sum(-1).abs() > 0.99).all()
