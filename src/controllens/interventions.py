"""Steering as nnsight interventions.

Call :func:`steer` (or :meth:`Steering.intervene`) inside ``model.trace(...)``
to steer one forward pass, or inside ``model.generate(...)`` with the tracer to
steer the prompt pass and every generated token. The edit is the same
``x <- x + alpha * u(k)`` as the TransformerLens hooks, computed from the same
:class:`~controllens.steering.Steering`.
"""

from typing import Any

import torch

from controllens.adapters import inspect_model
from controllens.errors import ModelError
from controllens.steering import Composed, Steering, Where

__all__ = ["steer"]


def _envoy(model: Any, path: str) -> Any:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _generation_steps(model: Any, tracer: Any) -> int | None:
    """Number of forward passes of a ``generate`` call; None for a trace."""
    if tracer is None or getattr(tracer.fn, "__name__", "") != "generate":
        return None
    steps = tracer.kwargs.get("max_new_tokens")
    if steps is None:
        steps = getattr(model._module.generation_config, "max_new_tokens", None)
    if steps is None:
        raise ValueError(
            "Steering a generate() call needs its length: pass max_new_tokens "
            "to model.generate(...)."
        )
    return int(steps)


def steer(steering: Steering | Composed, model: Any, tracer: Any | None = None) -> None:
    """Apply ``steering`` to an nnsight model from inside a tracing context.

    Args:
        steering: What to change and where (a :class:`Steering` or several
            composed with :func:`~controllens.steering.compose`).
        model: The nnsight ``LanguageModel`` being traced.
        tracer: The tracer of a ``model.generate(...)`` block; needed to steer
            every generated token. Inside ``model.trace(...)`` it may be
            omitted.

    Inside ``generate``, steering waits for each generation step, so make it
    the last statement of its invoke and read results in another invoke (or
    through ``tracer.result``): nnsight skips the code after a step loop when
    generation stops early at an end-of-sequence token.

    nnsight visits modules in forward order within one invoke, and so does
    this function: read layers shallower than the first steered layer before
    calling it, and deeper ones (or the logits) after it. Several steerings in
    one invoke work when their layers do not interleave; otherwise combine
    them into one :class:`Steering`.

    Examples:
        >>> from controllens.testing import tiny_nnsight
        >>> model = tiny_nnsight()
        >>> steering = Steering(errors=torch.randn(1, 32), layers=(1,), alpha=4.0)
        >>> with model.trace(torch.tensor([[1, 5, 9]])):
        ...     steer(steering, model)
        ...     logits = model.lm_head.output.save()
        >>> tuple(logits.shape)
        (1, 3, 104)
    """
    info = inspect_model(model)
    if info.kind != "nnsight":
        raise ModelError(
            f"steer() works on nnsight models, got a {info.kind} model. Use "
            "steering.hooks(model) or steering.apply(model) for TransformerLens."
        )
    steering.check_model(model)
    if steering.is_identity:
        return

    layers = _envoy(model, info.layers_path)
    base = _envoy(model, info.layers_path.rpartition(".")[0])
    steps = _generation_steps(model, tracer)
    sequence = _Sequence()
    # kept across the passes of one generation (see Steering.edit)
    memory: dict[Any, Any] = {}
    if steps is None:
        _steer_pass(steering, base, layers, sequence, memory)
        return
    for _ in tracer.iter[0:steps]:
        _steer_pass(steering, base, layers, sequence, memory)


class _Sequence:
    """Columns seen so far in one trace or generate call, and the prompt width."""

    def __init__(self) -> None:
        self.seen = 0
        self.prompt_len: int | None = None

    def advance(self, inputs: dict[str, Any]) -> Where:
        """Columns of this pass's tokens, each row's first real column and the
        prompt width."""
        mask = inputs.get("attention_mask")
        ids = inputs.get("input_ids")
        if ids is None:
            ids = inputs["inputs_embeds"]
        batch, seq_len = ids.shape[:2]
        # the mask spans the cached tokens too; without one (an unpadded
        # prompt) the columns are counted here
        total = mask.shape[1] if mask is not None else self.seen + seq_len
        self.seen = total
        if self.prompt_len is None:
            self.prompt_len = total
        if mask is None:
            first_real = torch.zeros(batch, dtype=torch.long)
        else:
            first_real = mask.to(torch.long).argmax(dim=1)
        columns = torch.arange(total - seq_len, total)
        return Where(columns, first_real, self.prompt_len)


def _steer_pass(
    steering: Steering | Composed,
    base: Any,
    layers: Any,
    sequence: _Sequence,
    memory: dict[Any, Any],
) -> None:
    """Edit every steered layer in one forward pass."""
    where = None
    if steering.needs_positions:
        # nnsight requires reading modules in the order the forward visits
        # them: the base model's inputs come before its layers
        where = sequence.advance(base.inputs[1])

    state: dict[Any, Any] = {"memory": memory}
    for layer in steering.layers:
        envoy = layers[layer]
        if steering.hook_point == "resid_pre":
            hidden = envoy.input
        else:
            output = envoy.output
            hidden = output[0] if isinstance(output, tuple) else output

        steered = steering.edit(layer, hidden, where, state)

        if steering.hook_point == "resid_pre":
            envoy.input = steered
        elif isinstance(output, tuple):
            envoy.output = (steered, *output[1:])
        else:
            envoy.output = steered
