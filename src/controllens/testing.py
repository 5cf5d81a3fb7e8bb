"""Tiny random models for tests, doctests and quick experiments.

They are built in memory from configs (no download), seeded, and small enough
to run in milliseconds: a three-layer Llama with a character-level tokenizer,
wrapped as a plain HF model, a TransformerBridge or an nnsight model. Each call
builds a fresh object with the same weights, so the wrappers never share one.
"""

import string
import warnings
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "tiny_bridge",
    "tiny_config_kwargs",
    "tiny_llama",
    "tiny_nnsight",
    "tiny_tokenizer",
]

_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (ids 0-3 are special).

    Examples:
        >>> tiny_tokenizer()("ab").input_ids
        [1, 14, 15]
    """
    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    # TransformerLens reloads a tokenizer by this name unless it already adds
    # BOS; with add_bos_token set it keeps this in-memory one.
    tokenizer.init_kwargs["name_or_path"] = "tiny-char"
    return tokenizer


def tiny_config_kwargs(*, n_layers: int = 3, d_model: int = 32) -> dict[str, Any]:
    """Config fields shared by the tiny models: sizes, vocabulary, special ids.

    Examples:
        >>> tiny_config_kwargs()["vocab_size"], tiny_config_kwargs()["hidden_size"]
        (104, 32)
    """
    return dict(
        vocab_size=len(_SPECIALS) + len(set(string.printable)),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_llama(
    *, n_layers: int = 3, d_model: int = 32, seed: int = 0
) -> LlamaForCausalLM:
    """A random Llama causal LM with the vocabulary of :func:`tiny_tokenizer`.

    Examples:
        >>> tiny_llama().config.num_hidden_layers
        3
    """
    config = LlamaConfig(**tiny_config_kwargs(n_layers=n_layers, d_model=d_model))
    config.architectures = [LlamaForCausalLM.__name__]
    config._name_or_path = "tiny-llama"
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def tiny_bridge(**kwargs: Any) -> Any:
    """:func:`tiny_llama` booted as a TransformerLens ``TransformerBridge``.

    Examples:
        >>> tiny_bridge().cfg.n_layers
        3
    """
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            "tiny-llama", hf_model=tiny_llama(**kwargs), tokenizer=tiny_tokenizer()
        )


def tiny_nnsight(**kwargs: Any) -> Any:
    """:func:`tiny_llama` wrapped as an nnsight ``LanguageModel``.

    Examples:
        >>> model = tiny_nnsight()
        >>> with model.trace("ab"):
        ...     hidden = model.model.layers[1].output.save()
        >>> hidden.shape  # [batch, pos, d_model]: BOS + 2 characters
        torch.Size([1, 3, 32])
    """
    from controllens.models import load_nnsight

    return load_nnsight(tiny_llama(**kwargs), tokenizer=tiny_tokenizer())
