"""Helpers of the import tests: a small byte-level BPE tokenizer with ChatML's control tokens (SmolLM2's
pre-tokenizer), and tiny random Hugging Face models written by save_pretrained, as a downloaded model
directory holds them. Nothing here needs the network or a large file."""

import json

import torch

VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt), as its GGUF file holds it.
CHATML_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def randomise(model, seed: int, std: float = 0.15):
    """Every weight drawn again (norm gains around 1, biases around 0), so that no test passes by an
    initialisation accident (unit norms, zero biases) and the logits are peaked enough for greedy decoding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            gain = p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if gain else (0.1 if p.dim() == 1 else std) * noise)
    return model.eval()


def tiny_llama(tied: bool = True, block: int = 256, seed: int = 0, **kw):
    """A random LlamaForCausalLM with grouped-query attention (4 heads, 2 key/value heads), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=block, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomise(LlamaForCausalLM(LlamaConfig(**cfg)), seed)


def tiny_gpt2(seed: int = 0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    torch.manual_seed(seed)
    return randomise(GPT2LMHeadModel(GPT2Config(**cfg)), seed)


def save_hf(model, bpe, path, template: str | None = "jinja"):
    """``model`` as a HF model directory: save_pretrained's config.json and model.safetensors, tokenizer.json,
    and the chat template as transformers 5 writes it (chat_template.jinja), as transformers 4 did (in
    tokenizer_config.json), or none."""
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(bpe.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    if template == "jinja":
        (path / "chat_template.jinja").write_text(CHATML_JINJA)
    elif template == "config":
        config["chat_template"] = CHATML_JINJA
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def greedy_hf(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` tokens HF's generate picks greedily (with its own KV cache), stopping at nothing."""
    out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                      eos_token_id=None, attention_mask=torch.ones_like(prompt))
    return out[:, prompt.size(1):]


def greedy_ours(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` tokens our engine picks greedily, with the KV cache."""
    from hybrid_gpt.infer.engine import generate

    return torch.cat(list(generate(model, prompt, n, temperature=0)), dim=1)
