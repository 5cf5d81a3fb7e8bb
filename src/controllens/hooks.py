"""Steering as TransformerLens hook functions.

The hooks follow the TransformerLens protocol ``fn(activation, hook) ->
activation``, so they work with ``run_with_hooks``, ``with model.hooks(...)``,
``add_hook`` and ``generate`` on a TransformerBridge (TransformerLens 4.x) and on
a HookedTransformer (3.x), next to any hooks of the user's own.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from controllens.adapters import decoder_layers, inspect_model, tl_hook_name
from controllens.errors import ModelError
from controllens.steering import Composed, Steering, Where

__all__ = ["steering_hooks"]


class _SequenceTracker:
    """Where the tokens of each forward call sit in the sequence.

    A TransformerLens hook sees only the activation. Under
    :meth:`Steering.apply` on a TransformerBridge, a pre-hook on the
    underlying Hugging Face model reads the length of the KV cache of every
    forward call (:meth:`probe`): 0 starts a new sequence, more continues one.
    Without it (bare ``steering.hooks(...)`` pairs, or a HookedTransformer) a
    rule stands in: a call of several tokens starts a new sequence, a call of
    one token after it continues that sequence, as generation does. That rule
    misreads a one-token prompt after an earlier call through the same hooks,
    and generation without a KV cache (``use_past_kv_cache=False``), which
    then looks like a series of new prompts.
    """

    def __init__(self, attention_mask: Int[Tensor, "batch pos"] | None) -> None:
        self._first_real = None
        if attention_mask is not None:
            self._first_real = attention_mask.to(torch.long).argmax(dim=1)
        self._seen: dict[int, int] = {}
        self._prompt_len: dict[int, int] = {}
        # the cache length of the current forward call, when probed
        self._start: int | None = None

    def probe(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the base model: read the KV cache's length and,
        when the call has one, the attention mask (so each row's first real
        token is known without passing the mask to ``apply``)."""
        cache = kwargs.get("past_key_values")
        length = getattr(cache, "get_seq_length", None)
        self._start = 0 if length is None else int(length())
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2:
            self._first_real = mask.to(torch.long).argmax(dim=1)

    def locate(
        self, layer: int, batch: int, seq_len: int, device: torch.device
    ) -> Where:
        if self._start is not None:
            start = self._start
            if start == 0 or layer not in self._prompt_len:
                self._prompt_len[layer] = seq_len
        else:
            seen = self._seen.get(layer, 0)
            if seq_len > 1 or layer not in self._prompt_len:
                start = 0
                self._prompt_len[layer] = seq_len
            else:
                start = seen
            self._seen[layer] = start + seq_len

        columns = torch.arange(start, start + seq_len, device=device)
        first_real = self._first_real
        if first_real is None or first_real.shape[0] != batch:
            first_real = torch.zeros(batch, dtype=torch.long)
        return Where(columns, first_real.to(device), self._prompt_len[layer])


@contextmanager
def applied(
    steering: Steering | Composed,
    model: Any,
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Iterator[Any]:
    """Steer a TransformerLens model inside a ``with`` block (see
    :meth:`Steering.apply`); hooks are removed on exit, also on errors.

    On a TransformerBridge the token positions come from the KV cache of each
    call (see :class:`_SequenceTracker`), so several generations and
    one-token prompts in one block are each located correctly.
    """
    hooks, tracker = _build_hooks(steering, model, attention_mask)
    handle = None
    base = _probed_module(model) if tracker is not None else None
    if base is not None:
        handle = base.register_forward_pre_hook(tracker.probe, with_kwargs=True)
    try:
        with model.hooks(fwd_hooks=hooks):
            yield model
    finally:
        if handle is not None:
            handle.remove()


def _probed_module(model: Any) -> Any:
    """The Hugging Face base model whose forward receives the KV cache."""
    hf_model = getattr(model, "original_model", None)
    if hf_model is None:
        return None
    path = decoder_layers(hf_model)[0].rpartition(".")[0]
    module = hf_model
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


def steering_hooks(
    steering: Steering | Composed,
    model: Any,
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> list[tuple[str, Callable]]:
    """TransformerLens ``(hook_name, hook_fn)`` pairs that apply ``steering``.

    Args:
        steering: What to change and where (a :class:`Steering` or several
            composed with :func:`~controllens.steering.compose`).
        model: The TransformerBridge or HookedTransformer to steer; checked for
            width and layer count.
        attention_mask: The prompt's attention mask, needed only when
            ``steering.positions`` is an int and the prompt is left-padded, so
            that positions count from each row's first real token.

    Returns:
        One pair per steered layer, in layer order. Pass them to
        ``model.run_with_hooks(..., fwd_hooks=...)`` or ``model.hooks(...)``.
        For ``positions`` other than ``"all"`` (and the feedback operator)
        the hooks of one call share a record of the sequence: a forward of
        several tokens starts a new prompt, a one-token forward after it is a
        generated token read from the KV cache. :meth:`Steering.apply` reads
        the KV cache's length instead, which also locates one-token prompts:
        prefer it for generation.

    Examples:
        >>> from controllens.testing import tiny_bridge
        >>> model = tiny_bridge()
        >>> r = torch.randn(2, model.cfg.d_model)
        >>> hooks = steering_hooks(Steering(errors=r, layers=(0, 2)), model)
        >>> [name for name, _ in hooks]
        ['blocks.0.hook_resid_post', 'blocks.2.hook_resid_post']
        >>> logits = model.run_with_hooks(torch.tensor([[1, 5, 9]]), fwd_hooks=hooks)
    """
    return _build_hooks(steering, model, attention_mask)[0]


def _build_hooks(
    steering: Steering | Composed,
    model: Any,
    attention_mask: Int[Tensor, "batch pos"] | None,
) -> tuple[list[tuple[str, Callable]], _SequenceTracker | None]:
    if inspect_model(model).kind != "transformer_lens":
        raise ModelError(
            f"Steering.hooks needs a TransformerLens model (TransformerBridge or "
            f"HookedTransformer), got {type(model).__name__}. For nnsight use "
            "steering.intervene(model, tracer); wrap a Hugging Face model with "
            "controllens.load_bridge(model, tokenizer=...)."
        )
    steering.check_model(model)
    if steering.is_identity:
        return [], None

    tracker = None
    if steering.needs_positions:
        tracker = _SequenceTracker(attention_mask)
    # shared by the layers of one forward pass, emptied at its first layer;
    # the memory lasts while one sequence is continued from the KV cache
    state: dict[Any, Any] = {}
    memory: dict[Any, Any] = {}
    first = steering.layers[0]

    def make_hook(layer: int) -> Callable:
        def hook(
            activation: Float[Tensor, "batch pos d_model"], hook: Any
        ) -> Float[Tensor, "batch pos d_model"]:
            where = None
            if tracker is not None:
                batch, seq_len = activation.shape[:2]
                where = tracker.locate(layer, batch, seq_len, activation.device)
            if layer == first:
                state.clear()
                if where is None or where.columns[0] == 0:
                    memory.clear()  # a new sequence
                state["memory"] = memory
            return steering.edit(layer, activation, where, state)

        hook.__name__ = f"controllens_steer_layer_{layer}"
        return hook

    hooks = [
        (tl_hook_name(steering.hook_point, layer), make_hook(layer))
        for layer in steering.layers
    ]
    return hooks, tracker
