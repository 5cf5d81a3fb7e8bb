import pytest
import torch

from controllens.controllers import Gains
from controllens.errors import ModelError
from controllens.models import load_bridge, load_hf
from controllens.steering import Steering

PROMPTS = ["The capital of France is", "My favourite film was"]


def test_a_folder_without_a_config_is_refused_without_any_download(tmp_path):
    with pytest.raises(ModelError, match="never downloads"):
        load_hf(tmp_path)


def test_one_hf_object_cannot_back_both_a_bridge_and_nnsight(tiny_hf):
    from controllens.models import load_nnsight
    from controllens.testing import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    load_nnsight(model, tokenizer=tiny_tokenizer())
    with pytest.raises(ModelError, match="second copy"):
        load_bridge(model, tokenizer=tiny_tokenizer())


@pytest.mark.slow
def test_bridge_greedy_generation_equals_hugging_face_token_for_token(
    smol_bridge, smol_hf
):
    # guards the transformers < 5.24 pin: newer releases leave the bridge's KV
    # cache empty and it generates garbage while forward passes look fine
    model, tokenizer = smol_hf
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=12, do_sample=False)
        got = smol_bridge.generate(
            ids, max_new_tokens=12, do_sample=False, verbose=False, stop_at_eos=False
        )
        assert got.tolist() == expected.tolist()


@pytest.mark.slow
def test_both_back_ends_steer_smollm2_to_the_same_logits_and_tokens(
    smol_bridge, smol_nnsight
):
    generator = torch.Generator().manual_seed(0)
    errors = torch.randn(4, 576, generator=generator) * 2.0
    steering = Steering(
        errors=errors,
        layers=(3, 10, 17, 24),
        gains=Gains.pid(0.9, 0.1, 0.1),
        alpha=4.0,
        n_layers=30,
    )
    tokenizer = smol_bridge.tokenizer
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids

    tl_logits = smol_bridge.run_with_hooks(ids, fwd_hooks=steering.hooks(smol_bridge))
    with smol_nnsight.trace(ids):
        steering.intervene(smol_nnsight)
        nn_logits = smol_nnsight.lm_head.output.save()
    torch.testing.assert_close(nn_logits, tl_logits, atol=1e-4, rtol=0)

    with steering.apply(smol_bridge):
        tl_tokens = smol_bridge.generate(
            ids, max_new_tokens=10, do_sample=False, verbose=False, stop_at_eos=False
        )
    with smol_nnsight.generate(max_new_tokens=10, do_sample=False) as tracer:
        with tracer.invoke(ids):
            steering.intervene(smol_nnsight, tracer)
        with tracer.invoke():
            nn_tokens = tracer.result.save()
    assert nn_tokens.tolist() == tl_tokens.tolist()
