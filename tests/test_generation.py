"""The shared generation interface: HF backend (tiny random model), API backend (fake client)."""

from __future__ import annotations

import importlib.util

import pytest

from daar_ops.generation import (APIGenerator, HFGenerator, TextGenerator,
                                 load_generator)
from daar_ops.models import SMOLLM2

CONV = [{"role": "user", "content": "Write an instruction pair about math."}]


@pytest.fixture(scope="module")
def tiny_gen(tiny_llama):
    return load_generator("hf", str(tiny_llama), batch_size=2)


def test_hf_generates_one_string_per_conversation_in_order(tiny_gen):
    convs = [CONV, [{"role": "user", "content": "hi"}], CONV]
    out = tiny_gen.generate(convs, max_new_tokens=8, seed=3)
    assert isinstance(tiny_gen, TextGenerator) and isinstance(tiny_gen, HFGenerator)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    # chat template special tokens never leak into the completion
    assert not any("<|im_start|>" in o or "<|im_end|>" in o for o in out)


def test_hf_seeded_generation_is_reproducible_and_seed_dependent(tiny_gen):
    convs = [CONV] * 4
    a = tiny_gen.generate(convs, max_new_tokens=12, seed=0)
    b = tiny_gen.generate(convs, max_new_tokens=12, seed=0)
    c = tiny_gen.generate(convs, max_new_tokens=12, seed=1)
    assert a == b
    assert a != c


def test_hf_left_padding_keeps_batched_equal_to_single_greedy(tiny_llama):
    gen1 = load_generator("hf", str(tiny_llama), batch_size=1)
    gen4 = load_generator("hf", str(tiny_llama), batch_size=4)
    convs = [CONV, [{"role": "user", "content": "x"}],
             [{"role": "user", "content": "a much longer prompt " * 5}]]
    single = gen1.generate(convs, max_new_tokens=6, do_sample=False)
    batched = gen4.generate(convs, max_new_tokens=6, do_sample=False)
    assert single == batched


def test_hf_stop_rule_finishes_rows_without_changing_the_others(tiny_llama):
    gen = load_generator("hf", str(tiny_llama), batch_size=3)
    convs = [CONV, [{"role": "user", "content": "hi"}], CONV]
    free = gen.generate(convs, max_new_tokens=16, seed=5)
    seen = []

    def stop(i, text):
        seen.append(i)
        return i == 1 and len(text) > 0  # only conversation 1 stops, after its first text

    stopped = gen.generate(convs, max_new_tokens=16, seed=5, stop=stop)
    assert stopped[0] == free[0] and stopped[2] == free[2]  # same random stream for the others
    assert free[1].startswith(stopped[1]) and len(stopped[1]) < len(free[1])
    assert set(seen) == {0, 1, 2}


def test_bare_strings_are_user_turns_and_bad_input_is_rejected(tiny_gen):
    assert len(tiny_gen.generate(["hello"], max_new_tokens=4)) == 1
    assert tiny_gen.generate([], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="conversation 0"):
        tiny_gen.generate([[{"text": "no role"}]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_gen.generate([CONV], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        tiny_gen.generate([CONV], top_p=0.0)


def test_load_generator_validates_arguments(tiny_llama):
    with pytest.raises(ValueError, match="unknown generation backend"):
        load_generator("nope", str(tiny_llama))
    with pytest.raises(ValueError, match="batch_size"):
        load_generator("hf", str(tiny_llama), batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        load_generator("hf", str(tiny_llama), dtype="int3")


def test_generators_load_once_per_setting_through_data_juicer(tiny_llama):
    from data_juicer.utils.model_utils import MODEL_ZOO, free_models

    from daar_ops.model_keys import load, model_key

    a = load(model_key("generator", backend="hf", model=str(tiny_llama), batch_size=3))
    b = load(model_key("generator", backend="hf", model=str(tiny_llama), batch_size=3))
    c = load(model_key("generator", backend="hf", model=str(tiny_llama), batch_size=2))
    assert a is b and a is not c
    free_models()  # what every Filter/Selector run ends with: the generators are released
    assert not MODEL_ZOO


def test_describe_records_model_identity(tiny_gen, tiny_llama):
    info = tiny_gen.describe()
    assert info["backend"] == "hf" and info["model_path"] == str(tiny_llama)
    assert info["model_fingerprint"] not in ("", "unknown")


class _FakeClient:
    def __init__(self):
        self.calls = []

    def __call__(self, messages, **params):
        self.calls.append((messages, params))
        if params["seed"] == 1:
            raise RuntimeError("server error")
        return f"answer {params['seed']}"


def test_api_backend_sends_sampling_params_and_survives_failed_requests():
    client = _FakeClient()
    gen = load_generator("api", "some-model", client=client)
    assert isinstance(gen, APIGenerator)
    out = gen.generate([CONV, CONV, CONV], max_new_tokens=7, temperature=0.5, top_p=0.9, seed=0)
    assert out == ["answer 0", "", "answer 2"]  # failed request -> "" (a malformed answer)
    messages, params = client.calls[0]
    assert messages == CONV
    assert params == {"max_tokens": 7, "seed": 0, "temperature": 0.5, "top_p": 0.9}


@pytest.mark.skipif(importlib.util.find_spec("openai") is not None, reason="openai installed")
def test_api_backend_without_openai_is_a_clear_error_not_an_install():
    with pytest.raises(ImportError, match="pip install openai"):
        load_generator("api", "some-model")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm installed")
def test_vllm_backend_without_vllm_is_a_clear_error():
    with pytest.raises(ImportError, match="vllm"):
        load_generator("vllm", SMOLLM2)


def test_assistant_last_turn_is_continued_not_answered(tiny_gen):
    prefill = [*CONV, {"role": "assistant", "content": "Instruction:"}]
    ids = tiny_gen._prompts([prefill])[0]
    text = tiny_gen.tokenizer.decode(ids)
    assert text.rstrip().endswith("Instruction:")  # no end-of-turn, no new assistant header
    assert text.count("<|im_start|>assistant") == 1
    plain = tiny_gen.tokenizer.decode(tiny_gen._prompts([CONV])[0])
    assert plain.endswith("<|im_start|>assistant\n")
    assert len(tiny_gen.generate([prefill], max_new_tokens=4)) == 1


def test_one_causal_lm_loader(tiny_llama, tmp_path):
    """load_causal_lm: precision, device, frozen or trainable, weights from another folder with
    the model's tokenizer, and the chat-template requirement."""
    import torch

    from daar_ops.causal_lm import load_causal_lm, load_tokenizer

    lm, tok = load_causal_lm(str(tiny_llama), "auto", "bf16", padding_side="left",
                             chat_template_for="chat generation")
    assert next(lm.parameters()).dtype == torch.bfloat16 and not lm.training
    assert not any(p.requires_grad for p in lm.parameters())
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    tuned, _ = load_causal_lm(str(tiny_llama), trainable=True)
    assert next(tuned.parameters()).dtype == torch.float32
    assert all(p.requires_grad for p in tuned.parameters())
    with torch.no_grad():
        next(tuned.parameters()).fill_(0.5)
    tuned.save_pretrained(tmp_path / "weights")
    again, tok2 = load_causal_lm(str(tiny_llama), weights=tmp_path / "weights")
    assert torch.all(next(again.parameters()) == 0.5)
    assert tok2.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(str(tiny_llama), dtype="int3")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    assert load_tokenizer(tmp_path / "plain").pad_token_id is not None
    with pytest.raises(ValueError, match="no chat template; chat generation needs one"):
        load_tokenizer(tmp_path / "plain", chat_template_for="chat generation")


def test_causal_lms_are_loaded_in_one_place():
    """Generation, the rater and the evaluation load through daar_ops.causal_lm (models.py only
    builds the prepared folder from its GGUF)."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "daar_ops"
    sources = {str(p.relative_to(package)): p.read_text() for p in package.rglob("*.py")}
    assert sorted(name for name, text in sources.items()
                  if "AutoModelForCausalLM.from_pretrained" in text) == ["causal_lm.py",
                                                                          "models.py"]
    users = [n for n in sources if n.startswith("evaluation") or n in ("generation.py",
                                                                        "raters.py")]
    assert len(users) > 3 and not [n for n in users if "AutoTokenizer" in sources[n]]
