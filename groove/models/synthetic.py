"""Small real checkpoints built locally: a byte-level BPE tokenizer trained on text that
ships with Python, and randomly initialised transformers models saved as safetensors.

Used by ``groove demo`` (until a trained model ships) and by the test suite; the files are
ordinary Hugging Face checkpoints and load through exactly the same code as any other.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus_text() -> str:
    """About 450 KB of English prose and examples that ships with every CPython. The demo
    model trains on the first 95% of its tokens and is validated on the rest."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, chat_template: bool = True):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_text()
    tok.train_from_iterator((text[i : i + 4096] for i in range(0, len(text), 4096)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )
    fast.save_pretrained(str(out_dir))
    return fast


ARCH_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 16}),
}


def build_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 4,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    dtype: str = "float32",
    seed: int = 0,
    tokenizer: bool = True,
    max_shard_size: str | None = None,
    initializer_range: float = 0.08,
    **overrides,
) -> Path:
    """Build a randomly initialised ``arch`` checkpoint (with tokenizer) in ``out_dir``.

    A larger ``initializer_range`` than transformers' default keeps the logits of a random
    model well separated, so greedy decoding is not decided by rounding noise.
    """
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        tok = build_tokenizer(out, vocab_size=vocab_size)
        eos = tok.eos_token_id
    else:
        eos = 0
    cls_name, defaults = ARCH_CONFIGS[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=eos,
        **defaults,
    )
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **save_kwargs)
    return out
