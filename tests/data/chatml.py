"""A tiny ChatML tokenizer for tests: byte-level BPE with SmolLM2's first special tokens and pre-tokenizer, and
SmolLM2-135M-Instruct's jinja chat template (what transformers renders, to compare our renderings with)."""

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hybrid_gpt.data.template import chatml_template
from hybrid_gpt.data.tokenizer import Tokenizer

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}")  # the same without a default system message
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]
TEXTS = ["ROMEO:\nBut soft, what light through yonder window breaks?\n\n", "JULIET:\nAy me! 1603\n\n\n",
         "system user assistant\n\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n"] * 20


def chatml_hf(vocab_size: int = 400) -> HFTokenizer:
    """A fresh `tokenizers` object (ids 0..3 are CHATML_SPECIALS, as in SmolLM2)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return hf


def chatml_tokenizer(default_system: str | None = SMOLLM2_SYSTEM) -> Tokenizer:
    return Tokenizer(chatml_hf(), chatml_template(default_system))


def chatml_checkpoint(path, layers: str = "AM", default_system: str | None = SMOLLM2_SYSTEM, **config) -> Tokenizer:
    """A smoke-sized checkpoint (``config`` overrides) at ``path`` with the ChatML tokenizer (chat_template.json
    beside it); its tokenizer."""
    from helpers import smoke_model

    from hybrid_gpt.checkpoint import save_checkpoint

    tok = chatml_tokenizer(default_system)
    save_checkpoint(path, smoke_model(layers, vocab_size=tok.vocab_size, **config), tok, {"stage": "import"})
    return tok
