"""Language-model fine-tuning of (merged-experts) models on a text file.

Checkpoints are safetensors files plus a JSON file of metadata; nothing is
pickled. A run resumed from a checkpoint continues with the same data order,
random state and optimizer moments as an uninterrupted run.
"""

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from controllens.camex.layers import collect_aux_losses
from controllens.errors import DataError, MetadataMismatchError

__all__ = [
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "load_text",
    "perplexity",
    "save_checkpoint",
    "train",
]

logger = logging.getLogger(__name__)

_STATE = "state.json"
_MODEL = "model.safetensors"
_OPTIMIZER = "optimizer.safetensors"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        grad_accum: micro-batches per optimizer step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        aux_loss_weight: weight of the summed load-balancing losses.
        max_grad_norm: gradient clipping norm (None: no clipping).
        train_layers: decoder layers whose MLP (dense or merged) is trained;
            every other parameter is frozen (``requires_grad=False``), so the
            backward pass stops at the lowest of them. None trains every
            parameter that requires a gradient.
        eval_every: steps between validation runs (None: only at the end).
        eval_batches: validation batches per run (None: the whole split).
        checkpoint_dir: where checkpoints go (None: no checkpoints).
        checkpoint_every: steps between checkpoints (None: only at the end).
        resume: continue from ``checkpoint_dir`` when it holds a checkpoint.
        seed: seed of the data order and of torch's generator.
        progress: show a tqdm progress bar.

    Examples:
        >>> config = TrainConfig(steps=10, batch_size=2, seq_len=16, grad_accum=4)
        >>> config.grad_accum * config.batch_size * config.seq_len  # tokens/step
        128
        >>> TrainConfig(steps=0)
        Traceback (most recent call last):
        ...
        ValueError: expected steps >= 1, got 0
    """

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    aux_loss_weight: float = 0.01
    max_grad_norm: float | None = 1.0
    train_layers: tuple[int, ...] | None = None
    eval_every: int | None = None
    eval_batches: int | None = 16
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class TrainResult:
    """What a training run measured.

    Attributes:
        losses: LM loss of each step (mean over its micro-batches).
        aux_losses: summed load-balancing loss of each step.
        step_times: seconds per step.
        val_perplexity: ``(step, perplexity)`` of each validation run.
        tokens_seen: training tokens consumed (this run, not the resumed part).
        start_step: the step a resumed run started from (0: a fresh run).

    Examples:
        >>> from controllens.testing import tiny_llama
        >>> ids = torch.arange(200) % 104  # a [train_tokens] token stream
        >>> result = train(tiny_llama(), ids, ids[:32], TrainConfig(
        ...     steps=2, batch_size=2, seq_len=8, progress=False))
        >>> len(result.losses), result.tokens_seen, result.start_step
        (2, 32, 0)
        >>> [step for step, _ in result.val_perplexity]  # only at the end
        [2]
    """

    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    val_perplexity: list[tuple[int, float]] = field(default_factory=list)
    tokens_seen: int = 0
    start_step: int = 0


def load_text(
    path: str | os.PathLike, tokenizer: object, val_fraction: float = 0.1
) -> tuple[Int[Tensor, " train_tokens"], Int[Tensor, " val_tokens"]]:
    """Tokenises a text file and splits it into training and validation tokens.

    The validation split is the last ``val_fraction`` of the characters, cut
    at a line break, so the two splits share no text.

    Examples:
        >>> import tempfile
        >>> class Chars:  # a stand-in tokenizer: one id per character
        ...     def __call__(self, text):
        ...         return {"input_ids": [ord(c) for c in text]}
        >>> with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        ...     _ = f.write("ab\\ncd\\nef\\ngh\\n")
        ...     f.flush()
        ...     train_ids, val_ids = load_text(f.name, Chars(), val_fraction=0.25)
        >>> len(train_ids), len(val_ids)
        (9, 3)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a text file, got {str(path)!r}, which is missing")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"expected val_fraction in (0, 1), got {val_fraction}")
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut

    def encode(part: str) -> Tensor:
        return torch.tensor(tokenizer(part)["input_ids"], dtype=torch.long)

    return encode(text[:cut]), encode(text[cut:])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _loss(model: nn.Module, batch: Tensor) -> tuple[Tensor, Tensor]:
    batch = batch.to(_device(model))
    with collect_aux_losses(model) as aux:
        loss = model(input_ids=batch, labels=batch).loss
    return loss, (torch.stack(aux).sum() if aux else loss.new_zeros(()))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: Int[Tensor, " tokens"],
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> float:
    """Perplexity on consecutive, non-overlapping windows of a token stream.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(
        ...     vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2))
        >>> 1.0 < perplexity(model, torch.arange(64) % 32, seq_len=16) < 1e3
        True
    """
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise DataError(f"expected at least {seq_len} tokens, got {len(ids)}")
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    batches = windows.split(batch_size)
    if max_batches is not None:
        batches = batches[:max_batches]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(_device(model))
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.numel() - batch.shape[0]
        total += loss.item() * tokens
        count += tokens
    model.train(was_training)
    return math.exp(total / count)


def _trainable(model: nn.Module, layers: tuple[int, ...] | None) -> list[nn.Parameter]:
    if layers is None:
        return [p for p in model.parameters() if p.requires_grad]
    marks = tuple(f"layers.{i}.mlp." for i in layers)
    chosen = [p for n, p in model.named_parameters() if any(m in n for m in marks)]
    if not chosen:
        raise ValueError(
            f"expected parameters under layers {list(layers)}' MLPs, got none; "
            "check train_layers against the model's layer count"
        )
    chosen_ids = {id(p) for p in chosen}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen_ids)
    return chosen


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    data_rng: torch.Generator,
    metadata: dict | None = None,
) -> Path:
    """Saves the trainable weights, optimizer moments and random states.

    Files: ``model.safetensors`` (the parameters the optimizer updates, by
    name), ``optimizer.safetensors`` (moments, random states) and
    ``state.json`` (step, hyper-parameters, ``metadata``).

    Returns:
        The folder written.

    Examples:
        >>> import tempfile
        >>> from controllens.testing import tiny_llama
        >>> model = tiny_llama()
        >>> optimizer = torch.optim.AdamW(model.model.norm.parameters())
        >>> rng = torch.Generator().manual_seed(0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_checkpoint(tmp, model, optimizer, step=5, data_rng=rng)
        ...     sorted(p.name for p in path.iterdir())
        ['model.safetensors', 'optimizer.safetensors', 'state.json']
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    save_file(
        {names[id(p)]: p.detach().contiguous() for p in params},
        directory / _MODEL,
    )
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.data": data_rng.get_state(),
    }
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"state.{index}.{key}"] = torch.as_tensor(value).contiguous()
    save_file(tensors, directory / _OPTIMIZER)
    groups = [
        {k: v for k, v in g.items() if k != "params" and _jsonable(v)}
        for g in optimizer.param_groups
    ]
    state = {
        "step": step,
        "param_names": [names[id(p)] for p in params],
        "param_groups": groups,
        "metadata": metadata or {},
    }
    (directory / _STATE).write_text(json.dumps(state, indent=2))
    return directory


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def load_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_rng: torch.Generator,
) -> dict:
    """Restores what :func:`save_checkpoint` wrote; returns ``state.json``.

    Raises:
        MetadataMismatchError: a checkpoint written for other parameters.

    Examples:
        >>> import tempfile
        >>> from controllens.testing import tiny_llama
        >>> model = tiny_llama()
        >>> optimizer = torch.optim.AdamW(model.model.norm.parameters())
        >>> rng = torch.Generator().manual_seed(0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_checkpoint(tmp, model, optimizer, step=5, data_rng=rng)
        ...     _ = model.model.norm.weight.data.zero_()
        ...     state = load_checkpoint(tmp, model, optimizer, rng)
        >>> state["step"], state["param_names"]
        (5, ['model.norm.weight'])
        >>> model.model.norm.weight.data.unique()  # restored: [d_model] ones
        tensor([1.])
    """
    directory = Path(directory)
    state = json.loads((directory / _STATE).read_text())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    if state["param_names"] != [names[id(p)] for p in params]:
        raise MetadataMismatchError(
            f"expected a checkpoint of the parameters being trained, got one "
            f"for {len(state['param_names'])} other parameters in {directory}; "
            "use a fresh checkpoint_dir or the same model and train_layers"
        )
    weights = load_file(directory / _MODEL)
    with torch.no_grad():
        for param in params:
            param.copy_(weights[names[id(param)]])
    tensors = load_file(directory / _OPTIMIZER)
    for index, param in enumerate(params):
        prefix = f"state.{index}."
        moments = {
            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
        }
        if moments:
            optimizer.state[param] = moments
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update(saved)
    torch.set_rng_state(tensors["rng.torch"])
    data_rng.set_state(tensors["rng.data"])
    return state


def train(
    model: nn.Module,
    train_ids: Int[Tensor, " train_tokens"],
    val_ids: Int[Tensor, " val_tokens"] | None,
    config: TrainConfig,
) -> TrainResult:
    """Fine-tunes a causal LM on random windows of a token stream.

    The loss is the LM cross-entropy plus ``aux_loss_weight`` times the sum of
    the merged-experts layers' load-balancing losses. Gradients of
    ``grad_accum`` micro-batches are averaged before each AdamW step.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> torch.manual_seed(0) and None
        >>> model = LlamaForCausalLM(LlamaConfig(
        ...     vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2))
        >>> ids = torch.arange(400) % 32
        >>> result = train(model, ids, ids[:64], TrainConfig(
        ...     steps=3, batch_size=2, seq_len=16, lr=1e-2, progress=False))
        >>> len(result.losses), result.val_perplexity[-1][0]
        (3, 3)
    """
    if len(train_ids) <= config.seq_len + 1:
        raise DataError(
            f"expected more than {config.seq_len + 1} training tokens, got "
            f"{len(train_ids)}; use a longer text or a shorter seq_len"
        )
    torch.manual_seed(config.seed)
    data_rng = torch.Generator().manual_seed(config.seed)
    params = _trainable(model, config.train_layers)
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay
    )
    result = TrainResult()
    checkpoint = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if checkpoint and config.resume and (checkpoint / _STATE).is_file():
        state = load_checkpoint(checkpoint, model, optimizer, data_rng)
        result.start_step = state["step"]
        logger.info("resumed from %s at step %d", checkpoint, state["step"])

    def evaluate(step: int) -> None:
        if val_ids is not None:
            ppl = perplexity(
                model,
                val_ids,
                seq_len=config.seq_len,
                batch_size=config.batch_size,
                max_batches=config.eval_batches,
            )
            result.val_perplexity.append((step, ppl))

    model.train()
    bar = tqdm(
        range(result.start_step, config.steps),
        initial=result.start_step,
        total=config.steps,
        disable=not config.progress,
    )
    for step in bar:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = step_aux = 0.0
        for _ in range(config.grad_accum):
            offsets = torch.randint(
                0,
                len(train_ids) - config.seq_len,
                (config.batch_size,),
                generator=data_rng,
            )
            batch = torch.stack([train_ids[o : o + config.seq_len] for o in offsets])
            loss, aux = _loss(model, batch)
            ((loss + config.aux_loss_weight * aux) / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
            step_aux += aux.item() / config.grad_accum
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        result.step_times.append(time.perf_counter() - start)
        result.losses.append(step_loss)
        result.aux_losses.append(step_aux)
        result.tokens_seen += config.grad_accum * config.batch_size * config.seq_len
        bar.set_postfix(loss=f"{step_loss:.3f}")

        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            evaluate(done)
        if checkpoint and (
            done == config.steps
            or (config.checkpoint_every and done % config.checkpoint_every == 0)
        ):
            save_checkpoint(
                checkpoint,
                model,
                optimizer,
                step=done,
                data_rng=data_rng,
                metadata={"config": asdict(config)},
            )
    evaluate(config.steps)
    model.eval()
    return result
