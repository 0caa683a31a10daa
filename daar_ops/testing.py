"""Helpers for tests and tools that must run offline on CPU: a tiny random causal LM with a
locally trained tokenizer (no download), built in a second."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_CORPUS = [
    "Instruction: Write a function that adds two numbers. Output: def add(a, b): return a + b",
    "What is the capital of France? The capital of France is Paris.",
    "Solve 12 * 7. The answer is 84.",
    "If all cats are animals and Tom is a cat, is Tom an animal? Yes, by deduction.",
    "Explain photosynthesis in one sentence. Plants turn light, water and CO2 into sugar.",
    "Input: a list of integers. Output: the sorted list, using merge sort in O(n log n).",
]


def build_tiny_causal_lm(target: Path, arch: str = "llama", n_layers: int = 4,
                         hidden: int = 32, seed: int = 0) -> Path:
    """A random ``arch`` model with a locally trained byte-level BPE tokenizer, saved to target."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast,
                              Qwen2Config)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    common = dict(vocab_size=fast.vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=True)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


