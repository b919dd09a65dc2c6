"""A tiny random-weight Llama-style model with a word-level tokenizer, built locally (nothing from a hub), for
real vLLM trials on a CPU: `python -m autotune.tiny_model DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

VOCAB = 1024


def tiny_config(layers: int = 2, hidden: int = 256, heads: int = 4, kv_heads: int = 2, max_len: int = 4096) -> dict:
    """The tiny model's config.json (Hugging Face Llama keys): what build_tiny_model writes, and the shape the
    simulator and bench/gpu_probe.py --quick read without building weights."""
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "max_position_embeddings": max_len, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def build_tiny_model(out: str | Path, seed: int = 0, **shape) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**shape)
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            model_max_length=config["max_position_embeddings"]).save_pretrained(out)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    args = ap.parse_args()
    print(build_tiny_model(args.out))


if __name__ == "__main__":
    main()
