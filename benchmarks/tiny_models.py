"""Tiny randomly initialised models and their tokenizer: what the tests, the benchmarks' smoke
versions and the GPU check's pipeline run use where behaviour, not quality, is under test.

A 2-layer causal LM of one of several architectures, and a byte-level BPE tokenizer trained on
a few sentences of the builtin tasks, with SmolLM2's chat template. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

# The ChatML template of SmolLM2, so chat rendering behaves as with the real model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is 12 + 34? Answer with the number only. 46 0123456789 - +",
    "Classify the topic of the sentence as one of: sports, food, weather, technology.",
    "Sentence: The chef served a spicy curry. The storm hit the valley. Answer with the topic only.",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. ### Instruction: ### Input: ### Response: user assistant system",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = 0, arch: str = "llama"):
    """A 2-layer random causal LM. `arch`: llama (q/k/v/o, gate/up/down, no biases), qwen2
    (biases on q/k/v), mistral (llama's layers, an untied output head), gpt_neox (query_key_value, dense, dense_h_to_4h..., biases everywhere,
    an output head named embed_out), phi (q/k/v, dense, fc1/fc2, biases)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    shared = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=2, pad_token_id=0)
    extra = {"llama": dict(num_key_value_heads=2, tie_word_embeddings=True),
             "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
             "mistral": dict(num_key_value_heads=2, tie_word_embeddings=False),
             "gpt_neox": dict(rotary_pct=0.25, tie_word_embeddings=False),
             "phi": dict(num_key_value_heads=4, partial_rotary_factor=0.5,
                         tie_word_embeddings=False)}[arch]
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **shared, **extra))


def save_model(path: Path, tokenizer, arch: str = "llama", seed: int = 0) -> Path:
    build_model(len(tokenizer), seed, arch).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
