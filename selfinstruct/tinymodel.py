"""Build a tiny Llama model and tokenizer from scratch, with no hub access.

Tests, benchmarks and the offline demo need a real model that transformers, TRL and vLLM all load. This one
is random-init (or whatever training later makes of it): a byte-level BPE tokenizer trained on the given
texts, a ChatML chat template, and a 2-layer Llama whose head_dim is 64 (vLLM's CPU attention rejects 16).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _default_texts() -> list[str]:
    """A few thousand lines of English-like text so the tokenizer learns common merges."""
    words = (
        "the a an of to and in is it for on with as be by this that write give list explain describe "
        "classify summarize translate rewrite answer question sentence word words number numbers text "
        "input output instruction task example following reverse sort upper lower case letters count "
        "positive negative neutral yes no true false email story poem code python function list items "
        "name date time city country people person good bad best first last one two three four five"
    ).split()
    lines = []
    for i in range(3000):
        n = 4 + i % 12
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(n)) + ".")
    return lines


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    eos_token: str = "<|im_end|>",
) -> Path:
    """Write a loadable model + tokenizer to `out_dir` and return the path.

    `eos_token="<|endoftext|>"` makes it look like a base model that ships a chat template (Qwen2.5, Llama 3):
    its EOS is not the `<|im_end|>` its template ends turns with.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(texts) if texts is not None else _default_texts()

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token=eos_token,
        pad_token="<pad>",
        unk_token=None,
        model_max_length=max_position_embeddings,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out
