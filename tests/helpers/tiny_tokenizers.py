"""A word-level tokenizer with SmolLM2-Instruct's special tokens, built locally."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(40)]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def smollm2_like(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """SmolLM2-Instruct's specials: <|endoftext|> (id 0, the pretraining document token), a declared
    BOS <|im_start|> (1) that the tokenizer never adds (a chat-turn marker), EOS = PAD = <|im_end|> (2)."""
    vocab = {tok: i for i, tok in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
                                            + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = chat_template
    return tokenizer
