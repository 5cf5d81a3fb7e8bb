"""Measuring instruments: steered generation, a concept scorer and fluency.

The concept scorer must not be the steered model itself. The default is VADER,
a sentiment lexicon that ships inside its PyPI package; its own accuracy on
SST-2 dev is modest (about 0.67), which is why :func:`scorer_accuracy` is
reported next to every result.
"""

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from controllens.adapters import inspect_model
from controllens.steering import Steering
from controllens.tokens import encode, pad, resolve_tokenizer

__all__ = [
    "Continuations",
    "VaderScorer",
    "continuation_perplexity",
    "generate",
    "scorer_accuracy",
]

logger = logging.getLogger(__name__)


class VaderScorer:
    """Sentiment by the VADER lexicon: positive when the compound score is > 0.

    Examples:
        >>> VaderScorer().positive(["What a wonderful, moving film.", "Awful."])
        [True, False]
    """

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def scores(self, texts: Sequence[str]) -> list[float]:
        """Compound scores in [-1, 1]."""
        return [self._analyzer.polarity_scores(text)["compound"] for text in texts]

    def positive(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text reads as positive."""
        return [score > 0 for score in self.scores(texts)]


def scorer_accuracy(scorer: VaderScorer, path: str | Path) -> float:
    """Accuracy of a sentiment scorer on a labelled TSV (``sentence``, ``label``).

    Args:
        scorer: Anything with ``positive(texts) -> list[bool]``.
        path: A file like ``../shared/data/sst2/dev.tsv``.

    Returns:
        The share of sentences whose predicted sentiment matches the label
        (label 1: positive).

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "dev.tsv"
        ...     _ = path.write_text("sentence\\tlabel\\na wonderful film\\t1\\n"
        ...                         "a terrible film\\t0\\na must-see\\t1\\n")
        ...     round(scorer_accuracy(VaderScorer(), path), 3)  # misses "a must-see"
        0.667
    """
    from controllens.data import load_labelled_tsv

    texts = load_labelled_tsv(path)
    predicted = scorer.positive(list(texts.target) + list(texts.source))
    labels = [True] * len(texts.target) + [False] * len(texts.source)
    return sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)


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
    steering: Steering | None = None,
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
