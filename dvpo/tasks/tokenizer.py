"""A real Hugging Face tokenizer (`PreTrainedTokenizerFast`) for a task's character alphabet,
built in code (no files, no network): one token per character plus <pad>=0, <bos>=1, <eos>=2."""

from __future__ import annotations

from .base import BOS, EOS, PAD


def char_tokenizer(alphabet: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet))
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")   # one token per character
    tok.decoder = decoders.Fuse()                                                  # decode without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", model_max_length=512)
    return fast
