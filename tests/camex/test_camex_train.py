"""Tests of controllens.camex.train."""

import pytest
import torch
from tests.conftest import DATA_DIR
from transformers import LlamaConfig, LlamaForCausalLM

from controllens.camex.layers import MoEConfig
from controllens.camex.train import (
    TrainConfig,
    load_text,
    perplexity,
    train,
)
from controllens.camex.upcycle import UpcycleConfig, upcycle
from controllens.errors import DataError, MetadataMismatchError

SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"


class Bytes:
    """A stand-in tokenizer: one id per byte, so tests need no tokenizer files."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


def tiny_moe(method: str = "camex", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    moe = MoEConfig(
        n_experts=2,
        method=method,
        router="noisy_top_k",
        top_k=2,
        granularity="segment",
        segment_length=8,
    )
    return upcycle(
        LlamaForCausalLM(config),
        UpcycleConfig(layers=(0, 1), moe=moe, noise_std=0.05, seed=seed),
    )


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0))


def settings(**kwargs) -> TrainConfig:
    base = {"steps": 4, "batch_size": 2, "seq_len": 16, "lr": 1e-2, "progress": False}
    return TrainConfig(**(base | kwargs))


def test_training_lowers_the_loss_and_reports_perplexity(ids) -> None:
    model = tiny_moe()
    periodic = ids[:64].repeat(20)
    result = train(model, periodic, periodic[:128], settings(steps=15))
    assert result.losses[-1] < result.losses[0]
    assert len(result.step_times) == 15 and result.tokens_seen == 15 * 2 * 16
    assert result.val_perplexity[-1][0] == 15
    assert result.aux_losses[0] > 0


def test_a_resumed_run_matches_an_uninterrupted_one(ids, tmp_path) -> None:
    straight = tiny_moe()
    train(straight, ids, None, settings(grad_accum=2))

    resumed = tiny_moe()
    train(
        resumed,
        ids,
        None,
        settings(steps=2, grad_accum=2, checkpoint_dir=str(tmp_path)),
    )
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "state.json").is_file()
    resumed = tiny_moe()
    result = train(
        resumed, ids, None, settings(grad_accum=2, checkpoint_dir=str(tmp_path))
    )
    assert result.start_step == 2 and len(result.losses) == 2
    for (name, a), b in zip(
        straight.named_parameters(), resumed.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_a_checkpoint_of_other_parameters_is_refused(ids, tmp_path) -> None:
    train(tiny_moe(), ids, None, settings(steps=1, checkpoint_dir=str(tmp_path)))
    with pytest.raises(MetadataMismatchError, match="parameters being trained"):
        train(
            tiny_moe(),
            ids,
            None,
            settings(steps=2, checkpoint_dir=str(tmp_path), train_layers=(1,)),
        )


def test_train_layers_limits_what_changes(ids) -> None:
    model = tiny_moe("smear")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, ids, None, settings(steps=1, train_layers=(1,)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.mlp.") for n in changed)


def test_too_little_data_is_refused() -> None:
    with pytest.raises(DataError, match="more than 17 training tokens"):
        train(tiny_moe(), torch.arange(10), None, settings())
    with pytest.raises(DataError, match="at least 16 tokens"):
        perplexity(tiny_moe(), torch.arange(10), seq_len=16)


def test_a_missing_text_file_is_refused(tmp_path) -> None:
    with pytest.raises(DataError, match="missing"):
        load_text(tmp_path / "absent.txt", Bytes())


def test_fine_tuning_on_tinyshakespeare_lowers_validation_perplexity() -> None:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tinyshakespeare not found at {SHAKESPEARE.resolve()}")
    train_ids, val_ids = load_text(SHAKESPEARE, Bytes(), val_fraction=0.1)
    assert len(train_ids) > 900_000 and len(val_ids) > 90_000
    model = tiny_moe()
    before = perplexity(model, val_ids, seq_len=32, max_batches=4)
    result = train(
        model,
        train_ids,
        val_ids,
        settings(steps=20, batch_size=4, seq_len=32, eval_batches=4),
    )
    assert result.val_perplexity[-1][1] < before
