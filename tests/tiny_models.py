"""Tiny random-initialised Hugging Face model folders for fast tests (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "a", "of", "to", "and", "in", "on", "for", "with", "is", "was", "are", "market", "team", "film",
         "vote", "phone", "game", "music", "bank", "shares", "election", "player", "album", "software", "court",
         "season", "chip", "minister"]


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok, len(vocab)


def tiny_bert(folder: Path, layers: int = 2) -> Path:
    """A 2-block BERT (hidden 32) with a word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tok, vocab = _tokenizer("bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def tiny_llama(folder: Path, layers: int = 2) -> Path:
    """A 2-block Llama (hidden 32, untied LM head) with a word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, vocab = _tokenizer("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder
