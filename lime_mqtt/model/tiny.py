"""Tiny random-weight models (a Llama by default, or any supported family) with a
byte-level BPE tokenizer, made offline.

It behaves like a real Hugging Face model folder (config, safetensors, tokenizer, chat
template), so it exercises exactly the code paths of a real model in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The pump in hall three reports a pressure of 4.2 bar.",
    "Close valve V-17 before starting the maintenance of the cooling loop.",
    "Patients must fast for six hours before the procedure.",
    "The conveyor belt stopped at 14:32 because of an overload on motor M2.",
    "Wie spät ist es? Es ist halb drei. Où est la salle des machines ?",
    "Summarise the shift report: two alarms, one false, no injuries.",
]


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


# Each family's config class, with what makes it that family switched on at a tiny size:
# sliding windows shorter than the tests' contexts, soft-capping, partial rotary, biases.
FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 7}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 3}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5, "sliding_window": None}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 16,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 16,
                                         "sliding_window_pattern": 2, "final_logit_softcapping": 30.0}),
}


def tiny_config(family: str, vocab_size: int, hidden: int, layers: int, **ids: Any) -> Any:
    """A transformers config of ``family`` (a model_type) at a tiny size."""
    import transformers

    name, extra = FAMILY_CONFIGS[family]
    config = getattr(transformers, name)(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **{**extra, **ids},
    )
    return config


def write_tiny_model(folder: Path, *, layers: int = 6, hidden: int = 64, seed: int = 0, family: str = "llama",
                     dtype: str = "float32") -> Path:
    """Write a random model of ``family`` (``layers`` decoder layers, weights in ``dtype``)
    and its tokenizer into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    # transformers' fast tokenizer (TokenizersBackend) has an unannotated __init__
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_tokenizer(vocab_size=384),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = tiny_config(family, len(tokenizer), hidden, layers, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()  # type: ignore[no-untyped-call]
    # Larger random weights give peaked, varied logits, so greedy text is not one token repeated.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.4 if family.startswith('gemma') else 0.5)
            elif family.startswith("gemma"):
                param.normal_(0.0, 0.1)  # Gemma norms scale by 1 + w; w starts at zero
    model = model.to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder
