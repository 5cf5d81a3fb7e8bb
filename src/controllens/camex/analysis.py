"""What merge analysis needs from a hooked MoE model, whatever wraps it.

The analyses (:mod:`~controllens.camex.routing`,
:mod:`~controllens.camex.similarity`, :mod:`~controllens.camex.probes`) work
on Hugging Face sparse MoE blocks (Mixtral, OLMoE, Qwen2-MoE and the Mixtral
export of :func:`~controllens.camex.upcycle.save_mixtral`) inside a
TransformerBridge, an nnsight ``LanguageModel`` or a plain HF model. Such a
block holds a router ``gate`` (returning logits, top-k weights and top-k
indices) and an ``experts`` module whose weights are batched 3-D tensors
(``gate_up_proj``, ``down_proj``). This module finds those blocks, reads
their weights, computes every expert's output on given tokens, and streams
calibration text in batches.

MoE axis names, besides TransformerLens' ``batch``, ``pos``, ``d_model``,
``d_mlp`` (the width of one expert), ``d_vocab``, ``layer``: ``tokens`` (the
batch and position axes flattened, as the router sees them), ``expert``
(routed experts) and ``top_k`` (the experts chosen per token).
"""

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from controllens.adapters import decoder_layers, inspect_model
from controllens.errors import DataError, HookPointError, LayerError, ModelError

__all__ = [
    "MoELayer",
    "RoutingHooks",
    "calibration_batches",
    "find_moe_layers",
    "token_windows",
]

# attribute names of the MoE block on a decoder layer, in HF models
_BLOCK_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")

Data = Sequence[str] | Tensor | Iterable[Tensor]


def _unwrap(module: nn.Module) -> nn.Module:
    """The HF module under TransformerBridge wrappers (itself if unwrapped)."""
    while isinstance(getattr(module, "original_component", None), nn.Module):
        module = module.original_component
    return module


@dataclass(frozen=True, kw_only=True)
class RoutingHooks:
    """Where routing is read: hook names on a bridge, a module path in nnsight.

    The defaults are those of transformers 5 sparse MoE blocks; GPT-OSS-style
    models name their router ``router`` instead of ``gate``.

    Attributes:
        logits: TransformerLens hook of the router logits ``[tokens, expert]``.
        weights: hook of the routing weights, scattered to ``[tokens, expert]``.
        indices: hook of the chosen experts ``[tokens, top_k]``.
        router: path of the router module under a decoder layer (nnsight and
            plain HF models), whose output is ``(logits, weights, indices)``.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe_bridge
        >>> hooks = RoutingHooks()
        >>> names = [hooks.logits.format(layer=1), hooks.indices.format(layer=1)]
        >>> _, cache = tiny_moe_bridge().run_with_cache(
        ...     torch.tensor([[1, 14, 15]]), names_filter=names)
        >>> [tuple(cache[name].shape) for name in names]  # logits, indices
        [(3, 4), (3, 2)]
        >>> RoutingHooks(router="mlp.router").router  # a GPT-OSS-style model
        'mlp.router'
    """

    logits: str = "blocks.{layer}.mlp.gate.hook_out"
    weights: str = "blocks.{layer}.mlp.hook_expert_weights"
    indices: str = "blocks.{layer}.mlp.hook_expert_indices"
    router: str = "mlp.gate"


@dataclass(frozen=True, kw_only=True, eq=False)
class MoELayer:
    """One sparse MoE block of a model, with the modules the forward pass calls.

    Attributes:
        layer: decoder layer index.
        block: the MoE block (a bridge wrapper where the model is a bridge).
        router: the router module called by the block.
        experts: the experts module called by the block.
        n_experts: routed experts.
        top_k: experts chosen per token.
        d_model: residual width.
        d_mlp: hidden width of one expert.
        has_shared: whether a shared expert is added beside the routed ones.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe
        >>> m = find_moe_layers(tiny_moe("qwen2_moe"))[1]
        >>> m.layer, m.n_experts, m.top_k, m.d_model, m.d_mlp, m.has_shared
        (1, 4, 2, 32, 64, True)
        >>> m.expert_outputs(torch.randn(5, 32)).shape  # [tokens, expert, d_model]
        torch.Size([5, 4, 32])
    """

    layer: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    n_experts: int
    top_k: int
    d_model: int
    d_mlp: int
    has_shared: bool

    @property
    def act_fn(self) -> Callable[[Tensor], Tensor]:
        """The experts' activation (SiLU in the supported families)."""
        return _unwrap(self.experts).act_fn

    def projections(
        self,
    ) -> tuple[
        Float[Tensor, "expert d_mlp d_model"],
        Float[Tensor, "expert d_mlp d_model"],
        Float[Tensor, "expert d_model d_mlp"],
    ]:
        """The gate, up and down weights of every expert, as ``[out, in]`` maps.

        These are views of the model's parameters (detached), not copies.

        Examples:
            >>> from controllens.camex.tiny import tiny_moe
            >>> layer = find_moe_layers(tiny_moe(n_experts=3))[0]
            >>> [tuple(w.shape) for w in layer.projections()]
            [(3, 64, 32), (3, 64, 32), (3, 32, 64)]
        """
        experts = _unwrap(self.experts)
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        if getattr(experts, "is_transposed", False):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        gate, up = gate_up.chunk(2, dim=1)
        return gate, up, down

    @contextlib.contextmanager
    def replaced(
        self,
        gate: Float[Tensor, "expert d_mlp d_model"],
        up: Float[Tensor, "expert d_mlp d_model"],
        down: Float[Tensor, "expert d_model d_mlp"],
    ) -> Iterator[None]:
        """Runs the model with other expert weights in place, then restores them.

        The model's own forward pass runs unchanged on the new weights.
        """
        experts = _unwrap(self.experts)
        gate_up = torch.cat([gate, up], dim=1)
        if getattr(experts, "is_transposed", False):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        saved = [p.detach().clone() for p in (experts.gate_up_proj, experts.down_proj)]
        try:
            with torch.no_grad():
                experts.gate_up_proj.copy_(gate_up)
                experts.down_proj.copy_(down)
            yield
        finally:
            with torch.no_grad():
                experts.gate_up_proj.copy_(saved[0])
                experts.down_proj.copy_(saved[1])

    def hidden(
        self, x: Float[Tensor, "tokens d_model"]
    ) -> tuple[
        Float[Tensor, "tokens expert d_mlp"],
        Float[Tensor, "tokens expert d_mlp"],
    ]:
        """Every expert's gate and up pre-activations on every token."""
        gate, up, _ = self.projections()
        x = x.to(gate.dtype)
        return torch.einsum("td,emd->tem", x, gate), torch.einsum("td,emd->tem", x, up)

    def expert_outputs(
        self, x: Float[Tensor, "tokens d_model"]
    ) -> Float[Tensor, "tokens expert d_model"]:
        """What every expert would output on every token (unweighted).

        Examples:
            >>> from controllens.camex.tiny import tiny_moe
            >>> layer = find_moe_layers(tiny_moe(n_experts=3))[1]
            >>> layer.expert_outputs(torch.randn(5, 32)).shape
            torch.Size([5, 3, 32])
        """
        g, u = self.hidden(x)
        _, _, down = self.projections()
        return torch.einsum("tem,edm->ted", self.act_fn(g) * u, down)


def _check_experts(experts: nn.Module, where: str) -> None:
    names = {n for n, _ in experts.named_parameters(recurse=False)}
    if not {"gate_up_proj", "down_proj"} <= names:
        raise ModelError(
            f"expected batched expert weights gate_up_proj and down_proj at "
            f"{where}, got {type(experts).__name__} with parameters "
            f"{sorted(names)}; merge analysis supports gated experts stored as "
            "3-D tensors (transformers 5 Mixtral, OLMoE, Qwen2-MoE)"
        )
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise ModelError(
            f"expected bias-free gated experts at {where}, got has_bias="
            f"{getattr(experts, 'has_bias', None)}, has_gate="
            f"{getattr(experts, 'has_gate', None)}"
        )
    if not getattr(experts, "is_concatenated", True):
        raise ModelError(
            f"expected gate and up weights concatenated at {where}, got an "
            "interleaved layout, which merge analysis does not read"
        )


def _moe_block(decoder: nn.Module) -> tuple[str, nn.Module] | None:
    for name in _BLOCK_NAMES:
        block = getattr(decoder, name, None)
        if isinstance(block, nn.Module):
            inner = _unwrap(block)
            if isinstance(getattr(inner, "gate", None), nn.Module) and isinstance(
                getattr(inner, "experts", None), nn.Module
            ):
                return name, block
    return None


def find_moe_layers(
    model: Any, layers: int | Iterable[int] | None = None
) -> tuple[MoELayer, ...]:
    """The sparse MoE blocks of a model, in layer order.

    Args:
        model: a TransformerBridge, nnsight ``LanguageModel`` or HF causal LM.
        layers: decoder layer indices (negative ones count from the end);
            None for every MoE layer.

    Returns:
        One :class:`MoELayer` per chosen layer.

    Raises:
        ModelError: a model without any MoE block, or experts in a layout the
            analyses cannot read.
        LayerError: an index outside the model, or a layer with a dense MLP.

    Examples:
        >>> from controllens.camex.tiny import tiny_moe
        >>> [(m.layer, m.n_experts, m.top_k) for m in find_moe_layers(tiny_moe())]
        [(0, 4, 2), (1, 4, 2)]
    """
    info = inspect_model(model)
    if info.hf_model is None:
        raise ModelError(
            f"expected a model wrapping a Hugging Face MoE model, got "
            f"{type(model).__name__} without one (a TransformerLens 3.x "
            "HookedTransformer); boot a TransformerBridge instead"
        )
    _, decoders = decoder_layers(info.hf_model)
    found: dict[int, MoELayer] = {}
    for index, decoder in enumerate(decoders):
        located = _moe_block(decoder)
        if located is None:
            continue
        name, block = located
        inner = _unwrap(block)
        router, experts = inner.gate, inner.experts
        _check_experts(_unwrap(experts), f"layer {index} ({name}.experts)")
        gate_up = _unwrap(experts).gate_up_proj
        transposed = getattr(_unwrap(experts), "is_transposed", False)
        n_experts, width, d_model = gate_up.shape
        if transposed:
            d_model, width = width, d_model
        found[index] = MoELayer(
            layer=index,
            block=block,
            router=router,
            experts=experts,
            n_experts=int(n_experts),
            top_k=int(getattr(_unwrap(router), "top_k", 1)),
            d_model=int(d_model),
            d_mlp=int(width) // 2,
            has_shared=hasattr(inner, "shared_expert"),
        )
    if not found:
        first = decoders[0] if len(decoders) else None
        children = [n for n, _ in first.named_children()] if first is not None else []
        raise ModelError(
            f"expected a mixture-of-experts model (decoder layers whose MLP has "
            f"a `gate` router and batched `experts`), got "
            f"{type(info.hf_model).__name__} with {len(decoders)} layers and no "
            f"MoE block (layer 0 has {children}); use a Mixtral, OLMoE or "
            "Qwen2-MoE model, or export an upcycled model with save_mixtral"
        )
    if layers is None:
        return tuple(found.values())
    chosen = [layers] if isinstance(layers, int) else list(layers)
    result = []
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"expected integer layer indices, got {layer!r}")
        if not -len(decoders) <= layer < len(decoders):
            raise LayerError(
                f"expected a layer index in [-{len(decoders)}, {len(decoders)}), "
                f"got {layer}; the model has {len(decoders)} layers and MoE "
                f"layers {tuple(found)}"
            )
        index = layer % len(decoders)
        if index not in found:
            raise LayerError(
                f"expected an MoE layer, got layer {index}, which has a dense "
                f"MLP; the MoE layers are {tuple(found)}"
            )
        if found[index] not in result:
            result.append(found[index])
    if not result:
        raise LayerError(f"expected at least one layer, got {chosen!r}")
    return tuple(sorted(result, key=lambda m: m.layer))


def token_windows(
    text: str, tokenizer: Any, *, seq_len: int, n_windows: int | None = None
) -> Int[Tensor, "batch pos"]:
    """Cuts a long text into consecutive windows of ``seq_len`` token ids.

    Args:
        text: for example a corpus file's contents.
        tokenizer: the model's tokenizer (no special tokens are added).
        seq_len: tokens per window.
        n_windows: the first windows to keep (None: all whole windows).

    Examples:
        >>> from controllens.testing import tiny_tokenizer
        >>> token_windows("abcdefgh", tiny_tokenizer(), seq_len=3).shape
        torch.Size([2, 3])
    """
    if seq_len < 1:
        raise DataError(f"expected seq_len >= 1, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    if n_windows is not None:
        count = min(count, n_windows)
    if count == 0:
        raise DataError(
            f"expected a text of at least {seq_len} tokens, got {len(ids)}; "
            "pass a longer text or a smaller seq_len"
        )
    return torch.tensor(ids[: count * seq_len]).reshape(count, seq_len)


def calibration_batches(
    data: Data, tokenizer: Any = None, *, batch_size: int = 8
) -> Iterator[tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]]:
    """Token ids and attention masks, one batch at a time.

    Args:
        data: texts (tokenized without special tokens, right-padded), a tensor
            of token ids ``[n, pos]`` split into batches, or an iterable of
            token-id batches (consumed lazily, so memory is bounded by a batch).
        tokenizer: the model's tokenizer (needed for texts only).
        batch_size: rows per batch for texts and tensors.

    Yields:
        ``(tokens, mask)``, the mask 1 on real tokens and 0 on padding.

    Examples:
        >>> from controllens.testing import tiny_tokenizer
        >>> [t.tolist() for t in next(calibration_batches(["ab", "c"],
        ...                                                tiny_tokenizer()))]
        [[[14, 15], [16, 0]], [[1, 1], [1, 0]]]
    """
    if batch_size < 1:
        raise DataError(f"expected batch_size >= 1, got {batch_size}")
    if isinstance(data, Tensor):
        data = data.split(batch_size)
    elif isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise DataError("expected a tokenizer with texts, got tokenizer=None")
        data = _pad_texts(list(data), tokenizer, batch_size)
    yielded = False
    for batch in data:
        if isinstance(batch, tuple):
            tokens, mask = batch
        else:
            tokens, mask = batch, None
        if not isinstance(tokens, Tensor) or tokens.ndim != 2:
            raise DataError(
                f"expected token-id batches of shape [batch, pos], got {tokens!r}"
            )
        yielded = True
        yield tokens.long(), torch.ones_like(tokens) if mask is None else mask
    if not yielded:
        raise DataError("expected calibration data, got none (no batches)")


def _pad_texts(
    texts: list[str], tokenizer: Any, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        rows = tokenizer(texts[start : start + batch_size], add_special_tokens=False)
        ids = [row for row in rows["input_ids"]]
        if any(len(row) == 0 for row in ids):
            raise DataError("expected non-empty texts, got one with no tokens")
        width = max(len(row) for row in ids)
        tokens = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        yield tokens, mask


class Runner:
    """Runs a wrapped model: logits, routing read through hooks, expert hooks.

    Not part of the public API; the analyses share it.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.info = inspect_model(model)
        self.kind = self.info.kind
        self.hf = self.info.hf_model
        self.device = self.info.device

    def logits(
        self, tokens: Tensor, mask: Tensor, *, grad: bool = False
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Next-token logits from the model's own forward pass."""
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        with torch.set_grad_enabled(grad):
            if self.kind == "transformer_lens":
                return self.model(tokens, attention_mask=mask, return_type="logits")
            # nnsight: the wrapped module is the same object a trace would run;
            # calling it directly keeps a backward pass possible for curvature
            output = self.hf(input_ids=tokens, attention_mask=mask, use_cache=False)
            return output.logits

    def routing(
        self,
        tokens: Tensor,
        mask: Tensor,
        layers: Sequence[MoELayer],
        hooks: RoutingHooks,
    ) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """Per layer: router logits, weights ``[tokens, expert]``, indices."""
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        if self.kind == "transformer_lens":
            return self._routing_tl(tokens, mask, layers, hooks)
        if self.kind == "nnsight":
            return self._routing_nnsight(tokens, mask, layers, hooks)
        return self._routing_hf(tokens, mask, layers, hooks)

    def _routing_tl(self, tokens, mask, layers, hooks) -> dict:
        names = {}
        available = set(self.model.hook_dict)
        for m in layers:
            for key in ("logits", "weights", "indices"):
                name = getattr(hooks, key).format(layer=m.layer)
                if name not in available:
                    near = sorted(
                        n for n in available if n.startswith(f"blocks.{m.layer}.mlp")
                    )
                    raise HookPointError(
                        f"expected hook point {name!r} on this TransformerBridge, "
                        f"got none; its MoE hook points at layer {m.layer} are "
                        f"{near}; pass RoutingHooks(...) with the right names"
                    )
                names[name] = (m.layer, key)
        seen: dict[int, dict[str, Tensor]] = {m.layer: {} for m in layers}

        def reader(layer: int, key: str) -> Callable[..., Tensor]:
            # aliased names (hook_expert_weights) fire under their target's name
            def read(activation: Tensor, hook: Any) -> Tensor:
                seen[layer][key] = activation.detach()
                return activation

            return read

        with torch.no_grad():
            self.model.run_with_hooks(
                tokens,
                attention_mask=mask,
                fwd_hooks=[(name, reader(*where)) for name, where in names.items()],
                return_type=None,
            )
        return {k: (v["logits"], v["weights"], v["indices"]) for k, v in seen.items()}

    def _router_module(self, layer: int, hooks: RoutingHooks, root: Any) -> Any:
        path = f"{self.info.layers_path}.{layer}.{hooks.router}"
        module = root
        for part in path.split("."):
            try:
                module = module[int(part)] if part.isdigit() else getattr(module, part)
            except (AttributeError, IndexError) as error:
                raise HookPointError(
                    f"expected a router module at {path!r}, got none ({error}); "
                    "pass RoutingHooks(router=...) with its path under a layer"
                ) from None
        return module

    def _routing_nnsight(self, tokens, mask, layers, hooks) -> dict:
        for m in layers:  # check the paths before tracing
            self._router_module(m.layer, hooks, self.hf)
        saved = {}
        with torch.no_grad(), self.model.trace(tokens, attention_mask=mask):
            for m in layers:
                output = self._router_module(m.layer, hooks, self.model).output
                saved[m.layer] = (output[0].save(), output[1].save(), output[2].save())
        return {
            layer: _scatter(logits, weights, indices)
            for layer, (logits, weights, indices) in saved.items()
        }

    def _routing_hf(self, tokens, mask, layers, hooks) -> dict:
        saved: dict[int, tuple] = {}

        def reader(layer: int) -> Callable[..., None]:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                saved[layer] = _scatter(*(t.detach() for t in output[:3]))

            return hook

        handles = [
            self._router_module(m.layer, hooks, self.hf).register_forward_hook(
                reader(m.layer)
            )
            for m in layers
        ]
        try:
            with torch.no_grad():
                self.hf(input_ids=tokens, attention_mask=mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return saved

    @contextlib.contextmanager
    def on_experts(
        self,
        layers: Sequence[MoELayer],
        fn: Callable[[MoELayer, Tensor, Tensor, Tensor, Tensor], Tensor | None],
    ) -> Iterator[None]:
        """Calls ``fn(layer, x, indices, weights, output)`` after each experts call.

        ``x`` is the experts' input ``[tokens, d_model]``, ``indices`` and
        ``weights`` the top-k routing ``[tokens, top_k]``; a tensor returned
        by ``fn`` replaces the experts' output (the routed mixture; a shared
        expert, where there is one, is added by the block afterwards).
        """

        def hook_for(m: MoELayer) -> Callable[..., Tensor | None]:
            def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any):
                values = list(args) + [
                    kwargs[k]
                    for k in ("top_k_index", "top_k_weights")
                    if k in kwargs and len(args) < 3
                ]
                x, indices, weights = values[:3]
                return fn(m, x, indices, weights, output)

            return hook

        handles = [
            m.experts.register_forward_hook(hook_for(m), with_kwargs=True)
            for m in layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _scatter(
    logits: Tensor, weights: Tensor, indices: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Routing weights ``[tokens, top_k]`` scattered to ``[tokens, expert]``."""
    if weights.shape[-1] != logits.shape[-1]:
        full = torch.zeros_like(logits, dtype=weights.dtype)
        weights = full.scatter(-1, indices.long(), weights)
    return logits, weights, indices


def next_token_terms(
    reference: Float[Tensor, "batch pos d_vocab"],
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
) -> tuple[float, float, float, int]:
    """Sums over predicted tokens: KL(reference || logits), both losses, count.

    A position counts when it and the next one are real tokens.
    """
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    ref = F.log_softmax(reference[:, :-1][keep].double(), -1)
    new = F.log_softmax(logits[:, :-1][keep].double(), -1)
    target = tokens[:, 1:][keep]
    kl = (ref.exp() * (ref - new)).sum(-1).clamp(min=0.0).sum()
    ref_loss = -ref.gather(-1, target[:, None]).sum()
    new_loss = -new.gather(-1, target[:, None]).sum()
    return float(kl), float(ref_loss), float(new_loss), int(keep.sum())
