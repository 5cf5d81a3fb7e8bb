"""Steering as TransformerLens hook functions.

The hooks follow the TransformerLens protocol ``fn(activation, hook) ->
activation``, so they work with ``run_with_hooks``, ``with model.hooks(...)``,
``add_hook`` and ``generate`` on a TransformerBridge (TransformerLens 4.x) and on
a HookedTransformer (3.x), next to any hooks of the user's own.
"""

import logging
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from controllens.adapters import tl_hook_name
from controllens.steering import Steering, add_masked, position_mask

__all__ = ["steering_hooks"]

logger = logging.getLogger(__name__)


class _SequenceTracker:
    """Where the tokens of each forward call sit in the sequence.

    A TransformerLens hook sees only the activation. A call of several tokens
    starts a sequence (a prompt, or a full pass without a KV cache); a call of
    one token after it continues that sequence from the KV cache. Each layer
    keeps its own count, since every layer sees every call.
    """

    def __init__(self, attention_mask: Int[Tensor, "batch pos"] | None) -> None:
        self._first_real = None
        if attention_mask is not None:
            self._first_real = attention_mask.to(torch.long).argmax(dim=1)
        self._seen: dict[int, int] = {}
        self._prompt_len: dict[int, int] = {}

    def locate(
        self, layer: int, batch: int, seq_len: int, device: torch.device
    ) -> tuple[Tensor, Tensor, int]:
        seen = self._seen.get(layer, 0)
        prompt_len = self._prompt_len.get(layer)
        if prompt_len is None or not (seq_len == 1 or seq_len == seen + 1):
            # a new sequence: this call is its prompt
            start, prompt_len = 0, seq_len
            self._prompt_len[layer] = seq_len
        else:
            start = seen if seq_len == 1 else 0
        self._seen[layer] = start + seq_len

        columns = torch.arange(start, start + seq_len, device=device)
        first_real = self._first_real
        if first_real is None or first_real.shape[0] != batch:
            first_real = torch.zeros(batch, dtype=torch.long)
        return columns, first_real.to(device), prompt_len


def _edit_for(
    control: Float[Tensor, " d_model"], cache: dict, activation: Tensor
) -> Tensor:
    key = (activation.dtype, activation.device)
    edit = cache.get(key)
    if edit is None:
        if key != (control.dtype, control.device):
            logger.info(
                "Casting the steering vector from %s on %s to %s on %s to match "
                "the activations.",
                control.dtype,
                control.device,
                *key,
            )
        edit = cache[key] = control.to(dtype=activation.dtype, device=activation.device)
    return edit


def steering_hooks(
    steering: Steering,
    model: Any,
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> list[tuple[str, Callable]]:
    """TransformerLens ``(hook_name, hook_fn)`` pairs that apply ``steering``.

    Args:
        steering: What to add and where.
        model: The TransformerBridge or HookedTransformer to steer; checked for
            width and layer count.
        attention_mask: The prompt's attention mask, needed only when
            ``steering.positions`` is an int and the prompt is left-padded, so
            that positions count from each row's first real token.

    Returns:
        One pair per steered layer, in layer order. Pass them to
        ``model.run_with_hooks(..., fwd_hooks=...)`` or ``model.hooks(...)``.
        The hooks of one call share a record of the sequence seen so far (for
        ``positions`` other than ``"all"``); make new hooks for a new prompt.

    Example:
        >>> from controllens.testing import tiny_bridge
        >>> model = tiny_bridge()
        >>> r = torch.randn(2, model.cfg.d_model)
        >>> hooks = steering_hooks(Steering(errors=r, layers=(0, 2)), model)
        >>> [name for name, _ in hooks]
        ['blocks.0.hook_resid_post', 'blocks.2.hook_resid_post']
        >>> logits = model.run_with_hooks(torch.tensor([[1, 5, 9]]), fwd_hooks=hooks)
    """
    steering.check_model(model)
    if steering.is_identity:
        return []

    tracker = None
    if steering.positions != "all":
        tracker = _SequenceTracker(attention_mask)
    controls = steering.control()
    hooks = []
    for layer, control in zip(steering.layers, controls, strict=True):
        if not control.any():
            continue
        hooks.append(
            (
                tl_hook_name(steering.hook_point, layer),
                _make_hook(layer, control, steering.positions, tracker),
            )
        )
    return hooks


def _make_hook(
    layer: int,
    control: Float[Tensor, " d_model"],
    positions: Any,
    tracker: _SequenceTracker | None,
) -> Callable:
    cache: dict = {}

    def hook(
        activation: Float[Tensor, "batch pos d_model"], hook: Any
    ) -> Float[Tensor, "batch pos d_model"]:
        edit = _edit_for(control, cache, activation)
        mask = None
        if tracker is not None:
            batch, seq_len = activation.shape[:2]
            columns, first_real, prompt_len = tracker.locate(
                layer, batch, seq_len, activation.device
            )
            mask = position_mask(
                positions, columns=columns, first_real=first_real, prompt_len=prompt_len
            )
        return add_masked(activation, edit, mask)

    hook.__name__ = f"controllens_steer_layer_{layer}"
    return hook
