"""Contrastive data: texts that show the behaviour to move towards (target)
and texts that show the behaviour to move away from (source).

Loaders for the formats controllens ships with real examples of: two lists of
texts, a labelled TSV (SST-2 style) and CAA-style A/B JSON.
"""

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controllens.errors import DataError

__all__ = [
    "ContrastiveTexts",
    "from_texts",
    "load_caa",
    "load_labelled_tsv",
    "sst2_prompts",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _check_side(texts: Any, side: str) -> tuple[str, ...]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(
            f"Expected the {side} texts as a list or tuple of strings, got "
            f"{type(texts).__name__}. Wrap a single text in a list."
        )
    if len(texts) == 0:
        raise DataError(
            f"Expected at least one {side} text, got none. Contrastive means need "
            "examples of both the target and the source behaviour."
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"Expected {side} text {i} to be a string, got {type(text).__name__}."
            )
        if not text.strip():
            raise DataError(
                f"Expected non-empty {side} texts, but text {i} is empty or blank. "
                "Remove it from the data."
            )
    return tuple(texts)


@dataclass(frozen=True, kw_only=True)
class ContrastiveTexts:
    """Two sets of texts: target (move towards) and source (move away from).

    Attributes:
        target: Texts showing the behaviour to steer towards.
        source: Texts showing the behaviour to steer away from.

    Examples:
        >>> data = ContrastiveTexts(target=("I loved it",), source=("I hated it",))
        >>> data.n_target, data.n_source
        (1, 1)
    """

    target: tuple[str, ...]
    source: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _check_side(self.target, "target"))
        object.__setattr__(self, "source", _check_side(self.source, "source"))

    @property
    def n_target(self) -> int:
        """Number of target texts."""
        return len(self.target)

    @property
    def n_source(self) -> int:
        """Number of source texts."""
        return len(self.source)


def from_texts(target: Sequence[str], source: Sequence[str]) -> ContrastiveTexts:
    """Contrastive data from two lists of texts.

    Args:
        target: Texts showing the behaviour to steer towards.
        source: Texts showing the behaviour to steer away from.

    Returns:
        The texts as :class:`ContrastiveTexts`.

    Raises:
        DataError: If either side is empty or holds a blank text.

    Examples:
        >>> data = from_texts(["a joy to watch"], ["a chore to sit through"])
        >>> data.target
        ('a joy to watch',)
    """
    return ContrastiveTexts(
        target=_check_side(target, "target"), source=_check_side(source, "source")
    )


def _read_tsv(
    path: PathLike, text_column: str, label_column: str
) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Expected a TSV file, but {str(path)!r} does not exist.")
    with path.open(encoding="utf-8", newline="") as f:
        # SST-2 text holds bare quotes: read fields verbatim, split on tabs only
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(
                f"Expected a header row in {str(path)!r}, got an empty file."
            )
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise DataError(
                f"Expected columns {text_column!r} and {label_column!r} in "
                f"{str(path)!r}, got {header}; missing {missing}. Pass text_column= "
                "and label_column= to name yours."
            )
        i_text, i_label = header.index(text_column), header.index(label_column)
        rows = []
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(i_text, i_label):
                raise DataError(
                    f"Line {n} of {str(path)!r} has {len(row)} fields, expected "
                    f"{len(header)} like the header."
                )
            rows.append((row[i_text].strip(), row[i_label].strip()))
    return rows


def load_labelled_tsv(
    path: PathLike,
    *,
    target_label: int | str = 1,
    text_column: str = "sentence",
    label_column: str = "label",
    limit: int | None = None,
) -> ContrastiveTexts:
    """Contrastive data from a labelled TSV file with a header row.

    Rows whose label equals ``target_label`` are targets; every other label is
    the source. With SST-2 (label 1 positive, 0 negative) the default steers
    from negative to positive sentiment.

    Args:
        path: The TSV file, for example ``sst2/train_sample.tsv``.
        target_label: The label of target rows (compared as text).
        text_column: Header of the text column.
        label_column: Header of the label column.
        limit: Keep at most this many texts per side (the first ones in file
            order); None for all.

    Returns:
        The texts as :class:`ContrastiveTexts`.

    Raises:
        DataError: If the file or a column is missing, or a side is empty.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "toy.tsv"
        ...     _ = path.write_text("sentence\\tlabel\\ngreat\\t1\\nawful\\t0\\n")
        ...     data = load_labelled_tsv(path)
        >>> data.target, data.source
        (('great',), ('awful',))
    """
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise DataError(f"Expected limit >= 1 or None, got {limit!r}.")
    rows = _read_tsv(path, text_column, label_column)
    wanted = str(target_label)
    target = [text for text, label in rows if label == wanted and text]
    source = [text for text, label in rows if label != wanted and text]
    if not target or not source:
        labels = sorted({label for _, label in rows})
        raise DataError(
            f"Expected rows with label {wanted!r} (target) and with other labels "
            f"(source) in {str(path)!r}; found labels {labels}. Check target_label."
        )
    if limit is not None:
        target, source = target[:limit], source[:limit]
    return from_texts(target, source)


def _caa_prompt(question: str, tokenizer: Any, chat_template: bool) -> str:
    if not chat_template:
        return question.rstrip() + "\n\nAnswer: "
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )
    # the template writes the start token itself; a tokenizer that also adds
    # one would put two in front of every text
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer("x")["input_ids"]
    adds_bos = bool(ids) and ids[0] == getattr(tokenizer, "bos_token_id", None)
    if bos and adds_bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :]
    return prompt


def _answer_letter(answer: Any, item: int, key: str) -> str:
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(
            f"Expected item {item} to have a non-empty string {key!r}, got {answer!r}."
        )
    return answer.strip().removesuffix(")")


def load_caa(
    path: PathLike,
    *,
    tokenizer: Any = None,
    chat_template: bool = False,
    balance: bool = True,
) -> ContrastiveTexts:
    """Contrastive data from a CAA-style A/B JSON file.

    Each item has a ``question`` (listing choices such as ``(A) ...`` and
    ``(B) ...``), an ``answer_matching_behavior`` and an
    ``answer_not_matching_behavior`` (such as ``"(A)"``). The target text is the
    question followed by the matching answer, the source text the question
    followed by the other answer.

    The closing parenthesis of the answer is dropped, so every text ends with
    the answer letter: ``"...\\n\\nAnswer: (A"``. Aggregation ``"last"`` then
    reads the activation at the letter, the position the CAA paper reads.

    Args:
        path: The JSON file (a list of items).
        tokenizer: The model's tokenizer, needed with ``chat_template=True``.
        chat_template: Put the question in a user turn of the tokenizer's chat
            template and the answer at the start of the assistant turn. Then
            pass ``chat_template=False`` to
            :func:`~controllens.vectors.contrastive_means`: the texts are
            already formatted.
        balance: Keep as many items whose matching answer is each letter
            (the first ones of each, in file order). The activation at the
            answer letter differs mostly by *which* letter it is, a difference
            far larger than the behaviour's; with unequal counts the mean
            difference r(k) then points along the letter axis. Balanced items
            cancel it.

    Returns:
        The texts as :class:`ContrastiveTexts`, in file order.

    Raises:
        DataError: If the file is missing, is not a JSON list of such items, or
            is empty.

    Examples:
        >>> import json, tempfile
        >>> item = {"question": "Pick one.\\n(A) yes\\n(B) no",
        ...         "answer_matching_behavior": "(A)",
        ...         "answer_not_matching_behavior": "(B)"}
        >>> flipped = item | {"answer_matching_behavior": "(B)",
        ...                   "answer_not_matching_behavior": "(A)"}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "ab.json"
        ...     _ = path.write_text(json.dumps([item, item, flipped]))
        ...     data = load_caa(path)
        >>> data.target[0][-12:], data.source[0][-2:]
        ('\\n\\nAnswer: (A', '(B')
        >>> data.n_target  # balanced: one item per matching letter
        2
    """
    path = Path(path)
    if chat_template and tokenizer is None:
        raise DataError(
            "chat_template=True needs the model's tokenizer: pass tokenizer=..."
        )
    if not path.is_file():
        raise DataError(f"Expected a JSON file, but {str(path)!r} does not exist.")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"Expected valid JSON in {str(path)!r}, got a parse error: {err}."
        ) from err
    if not isinstance(items, list) or not items:
        raise DataError(
            f"Expected a non-empty JSON list of A/B items in {str(path)!r}, got "
            f"{type(items).__name__} of length {len(items)}."
        )

    keys = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
    target, source, letters = [], [], []
    for i, item in enumerate(items):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            raise DataError(
                f"Expected item {i} of {str(path)!r} to have keys {list(keys)}, "
                f"missing {missing}. Open-ended items have no A/B answers: use the "
                "*_ab.json or generate_dataset.json files."
            )
        prompt = _caa_prompt(str(item["question"]), tokenizer, chat_template)
        letter = _answer_letter(item[keys[1]], i, keys[1])
        target.append(prompt + letter)
        source.append(prompt + _answer_letter(item[keys[2]], i, keys[2]))
        letters.append(letter)
    if balance:
        keep = _balanced(letters, path)
        target = [target[i] for i in keep]
        source = [source[i] for i in keep]
    return from_texts(target, source)


def _balanced(letters: list[str], path: Path) -> list[int]:
    """Indices of the first n items of each matching letter, n the rarest
    letter's count, in file order."""
    counts = {letter: letters.count(letter) for letter in sorted(set(letters))}
    if len(counts) < 2:
        raise DataError(
            f"Every item of {str(path)!r} has matching answer {letters[0]!r}, so "
            "the letters cannot be balanced; r(k) would measure the letter, not "
            "the behaviour. Pass balance=False to use the items as they are."
        )
    n = min(counts.values())
    seen = dict.fromkeys(counts, 0)
    keep = []
    for i, letter in enumerate(letters):
        if seen[letter] < n:
            seen[letter] += 1
            keep.append(i)
    return keep


def sst2_prompts(path: PathLike, n: int, n_words: int) -> tuple[str, ...]:
    """Prompts made of the first words of negative sentences in a labelled TSV.

    Args:
        path: A TSV with ``sentence`` and ``label`` columns, such as SST-2
            ``dev.tsv``.
        n: How many prompts (the first ``n`` negative sentences with more than
            ``n_words`` words, in file order).
        n_words: Words per prompt.

    Returns:
        ``n`` prompts.

    Raises:
        DataError: If the file has fewer than ``n`` long-enough negative
            sentences.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "dev.tsv"
        ...     _ = path.write_text("sentence\\tlabel\\nthe plot drags on\\t0\\n")
        ...     sst2_prompts(path, n=1, n_words=2)
        ('the plot',)
    """
    if n < 1 or n_words < 1:
        raise DataError(
            f"Expected n >= 1 and n_words >= 1, got n={n}, n_words={n_words}."
        )
    rows = _read_tsv(path, "sentence", "label")
    prompts = [
        " ".join(text.split()[:n_words])
        for text, label in rows
        if label == "0" and len(text.split()) > n_words
    ]
    if len(prompts) < n:
        raise DataError(
            f"Expected at least {n} negative sentences longer than {n_words} words "
            f"in {str(path)!r}, found {len(prompts)}. Ask for fewer or shorter "
            "prompts."
        )
    return tuple(prompts[:n])
