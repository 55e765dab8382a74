"""Tiny random Hugging Face models, one per family, built offline from configs.

Each family is a `XForCausalLM(config)` saved with `save_pretrained` next to a BPE tokenizer
trained offline with the `tokenizers` library (vocabulary ``VOCAB``, BOS ``<s>``), of the real
family's kind: byte-level BPE without BOS for GPT-2, Qwen2 and GPT-NeoX; Metaspace BPE whose
post-processor prepends BOS for Llama, Gemma and Mistral. Sizes: 2 layers, d_model 32-64, vocab 96.

The families exercise what the toolkit must not hard-code:

- ``gpt2``: LayerNorm, learned absolute positions, no BOS added by the tokenizer.
- ``llama``: RMSNorm, rotary, grouped-query attention (4 heads, 2 KV groups), BOS.
- ``qwen2``: like Llama with q/k/v biases and GQA; no BOS.
- ``gemma2``: attention-logit and final-logit soft-capping, alternating sliding-window layers with
  a window (``WINDOW``) smaller than the test prompts, sandwich norms, scaled embeddings, BOS.
- ``neox``: GPT-NeoX/Pythia: parallel attention + MLP, partial rotary (``rotary_pct`` 0.5).
- ``mistral``: sliding-window attention (window ``WINDOW``) everywhere, GQA, BOS.

Weights are seeded (``torch.manual_seed``) so every build is identical. `build(family, dir)`
writes the folder; tests reach it through the session fixtures `hf_folder` / `bridge_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt2", "llama", "qwen2", "gemma2", "neox", "mistral")
VOCAB = 96
WINDOW = 4  # sliding window (tokens): smaller than every test prompt, so it changes the logits
N_CTX = 64
BOS_FAMILIES = frozenset({"llama", "gemma2", "mistral"})  # their tokenizers prepend <s>
BYTE_LEVEL = frozenset({"gpt2", "qwen2", "neox"})  # GPT-2-style byte-level BPE; the others Metaspace

# Text the tokenizer is trained on (and a source of natural test prompts).
CORPUS = [
    "the eiffel tower is in paris", "the colosseum is in rome", "big ben is in london",
    "the statue of liberty is in new york", "the brandenburg gate is in berlin",
    "the capital of france is paris", "the capital of italy is rome", "the capital of germany is berlin",
    "alice went to the market and bought apples", "bob went to the park and saw a dog",
    "one two three four five six seven eight nine ten",
]


def tokenizer(bos: bool, byte_level: bool = False):
    """A BPE tokenizer trained on `CORPUS` with `<s>` as BOS/EOS/pad. `byte_level`: GPT-2's
    scheme (byte-level, a word's leading space is part of its token: " paris" is not "paris");
    else Llama's (Metaspace, ``▁`` marks a word start). When `bos` the post-processor prepends
    `<s>`, as Llama's, Gemma's and Mistral's tokenizers do; GPT-2's, Qwen's and GPT-NeoX's do not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "<unk>"]))
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="<unk>",
                                   pad_token="<s>")


def config(family: str):
    """The tiny HF config of `family` (2 layers)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=N_CTX, **common)  # n_inner: 4 x d_model, as GPT-2
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=N_CTX, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=N_CTX, use_sliding_window=False,
                              **common)
    if family == "gemma2":
        return tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=N_CTX,
                               sliding_window=WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                               query_pre_attn_scalar=16, **common)
    if family == "neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                rotary_pct=0.5, use_parallel_residual=True, max_position_embeddings=N_CTX, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=N_CTX, sliding_window=WINDOW,
                                **common)
    raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


def _randomise_(model, seed: int) -> None:
    # HF initialises norms to 1 and biases to 0; random values make a test unable to pass on a
    # symmetric initialisation (a bias that is never added, a norm weight that is ignored).
    g = torch.Generator().manual_seed(seed)
    gemma = "gemma" in model.config.model_type
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm_weight = name.endswith("weight") and ("norm" in name or ".ln_" in name)
                base = 1.0 if is_norm_weight and not gemma else 0.0  # Gemma's norms scale by (1 + w)
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def build(family: str, out: Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    """Write `family`'s random model (safetensors, config.json) and tokenizer into `out`;
    `vocab_size` widens the embedding (for token sets larger than the tokenizer's, e.g. an
    organism's dataset)."""
    import transformers as tf

    out = Path(out)
    cfg = config(family)
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    _randomise_(model, seed + FAMILIES.index(family))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer(family in BOS_FAMILIES, byte_level=family in BYTE_LEVEL).save_pretrained(out)
    return out


def hf_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The saved folder loaded with Hugging Face alone (the reference for every Bridge result)."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


def final_norm(hf) -> torch.nn.Module:
    """The HF model's final norm module (the reference for lens decoding)."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm"):
        mod = hf
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        return mod
    raise ValueError(f"final norm: expected one of model.norm, transformer.ln_f, gpt_neox.final_layer_norm in "
                     f"{type(hf).__name__}, got none")


def hf_decode(hf, hidden: torch.Tensor) -> torch.Tensor:
    """HF's own final norm + lm_head (+ final-logit soft cap) of a residual: the logit lens by hand."""
    logits = hf.get_output_embeddings()(final_norm(hf)(hidden))
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits
