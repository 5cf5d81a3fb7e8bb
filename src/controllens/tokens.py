"""Turning texts into token batches the same way for every back end.

A TransformerBridge swaps in a tokenizer that always prepends a BOS token,
nnsight and plain Hugging Face models use the model's own convention. Means,
sequential estimation and generation all encode texts here, with the HF
tokenizer's convention, so every back end sees the same ids.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from controllens.errors import DataError, ModelError

__all__ = ["adds_bos", "encode", "pad", "resolve_tokenizer", "token_weights"]


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` starts a text with its BOS token.

    Examples:
        >>> from controllens.testing import tiny_tokenizer
        >>> adds_bos(tiny_tokenizer())
        True
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("x")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def _hf_adds_bos(tokenizer: Any, kind: str) -> bool:
    """Whether the model's own Hugging Face tokenizer starts texts with a BOS.

    A TransformerBridge swaps in a copy of the tokenizer that always adds one;
    the original convention is read back from the tokenizer folder when it is
    a local one (TransformerLens keeps its BOS otherwise).
    """
    if kind != "transformer_lens" or not adds_bos(tokenizer):
        return adds_bos(tokenizer)
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not (folder / "tokenizer_config.json").is_file():
        return True
    from transformers import AutoTokenizer

    return adds_bos(AutoTokenizer.from_pretrained(folder, local_files_only=True))


def encode(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    bos: bool,
    chat_template: bool,
    max_length: int | None,
) -> list[list[int]]:
    """Token ids of each text, special tokens added by hand (BOS if ``bos``).

    Examples:
        >>> from controllens.testing import tiny_tokenizer
        >>> encode(["ab"], tiny_tokenizer(), bos=True, chat_template=False,
        ...        max_length=None)
        [[1, 14, 15]]
    """
    if chat_template:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for text in texts
        ]
    # special tokens by hand, so that every back end sees the same ids
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if bos:
        bos_id = tokenizer.bos_token_id
        ids = [row if row[:1] == [bos_id] else [bos_id, *row] for row in ids]
    if max_length is not None:
        ids = [row[:max_length] for row in ids]
    return ids


def pad(
    ids: list[list[int]], pad_id: int, side: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask [batch, pos], padded on ``side``.

    Examples:
        >>> tokens, mask = pad([[5, 6, 7], [8]], 0, "left", torch.device("cpu"))
        >>> tokens.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return tokens.to(device), mask.to(device)


def token_weights(
    mask: Tensor, aggregation: str, texts: Sequence[str], offset: int, side: str
) -> Tensor:
    """Weights [batch, pos] that turn token activations into one vector per text.

    ``"last"`` puts weight 1 on each row's last real token; ``"mean"`` spreads
    it over the real tokens after the first.

    Examples:
        >>> mask = torch.tensor([[1, 1, 1, 0]])
        >>> token_weights(mask, "mean", ["abc"], 0, "target").tolist()
        [[0.0, 0.5, 0.5, 0.0]]
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    if aggregation == "last":
        last = (mask * (positions + 1)).argmax(dim=-1)
        return torch.nn.functional.one_hot(last, mask.shape[1]).to(torch.float64)

    # the first real token is an attention sink whose norm is ~100x the others
    # (DESIGN.md, SmolLM2 measurements): leave it out, and the pads
    weights = mask.to(torch.float64)
    first = mask.argmax(dim=-1)
    weights[torch.arange(mask.shape[0], device=mask.device), first] = 0.0
    counts = weights.sum(dim=-1, keepdim=True)
    if (counts == 0).any():
        i = int((counts[:, 0] == 0).nonzero()[0, 0])
        raise DataError(
            f"The {side} text {offset + i} ({texts[offset + i]!r}) has a single "
            "token, and aggregation 'mean' leaves out the first token. Use "
            "aggregation='last' or longer texts."
        )
    return weights / counts


def resolve_tokenizer(
    info: Any, tokenizer: Any, chat_template: bool, prepend_bos: bool | None
) -> tuple[Any, bool]:
    """The tokenizer to encode texts with, and whether to prepend a BOS.

    Examples:
        >>> from controllens.adapters import inspect_model
        >>> from controllens.testing import tiny_llama, tiny_tokenizer
        >>> info = inspect_model(tiny_llama())
        >>> resolve_tokenizer(info, tiny_tokenizer(), False, None)[1]
        True
    """
    if tokenizer is None:
        if info.tokenizer is None:
            raise ModelError(
                f"Expected a tokenizer for this {info.kind} model, got none: pass "
                "tokenizer=... (load_hf returns one)."
            )
        tokenizer, bos = info.tokenizer, _hf_adds_bos(info.tokenizer, info.kind)
    else:
        bos = adds_bos(tokenizer)
    if chat_template:
        bos = False
    if prepend_bos is not None:
        bos = prepend_bos
    if bos and tokenizer.bos_token_id is None:
        raise ModelError(
            "Expected a tokenizer with a BOS token for prepend_bos=True, got one "
            "without. Pass prepend_bos=False."
        )
    return tokenizer, bos
