"""Tokenizers saved beside a linattn model, built with the `tokenizers` library so that
AutoTokenizer loads them with no custom code.

byte_tokenizer(): the text task's vocabulary (linattn.tasks.text): id 0 is "<bos>" (BOS,
    end of document and padding), id b + 1 is byte b. Encoding prepends "<bos>", as the
    text task starts every document with it; decoding is exact for any bytes (invalid UTF-8
    shows as U+FFFD).
task_tokenizer(vocab_size): a synthetic task's vocabulary: id 0 is "<bos>", id i the word
    str(i); text is space-separated ids ("<bos> 5 17 3"), which is how `linattn generate`
    shows a task run's tokens without knowing the task's own symbols.
"""
from __future__ import annotations

BOS_TOKEN = "<bos>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _wrap(tok, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN,
                                   pad_token=BOS_TOKEN, unk_token=BOS_TOKEN, padding_side="left", **kw)


def byte_tokenizer():
    """A PreTrainedTokenizerFast over 257 ids: "<bos>" = 0, byte b = b + 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = bytes_to_unicode()
    vocab = {BOS_TOKEN: 0, **{chars[b]: b + 1 for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=BOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A",
                                                       special_tokens=[(BOS_TOKEN, 0)])
    tok.add_special_tokens([BOS_TOKEN])
    return _wrap(tok)


def task_tokenizer(vocab_size: int):
    """A PreTrainedTokenizerFast over a synthetic task's ids: "<bos>" = 0, "i" = i."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    vocab = {BOS_TOKEN: 0, **{str(i): i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A",
                                                       special_tokens=[(BOS_TOKEN, 0)])
    tok.add_special_tokens([BOS_TOKEN])
    return _wrap(tok)


def tokenizer_for(task: dict | None, vocab_size: int):
    """The byte tokenizer for the text task, else a task_tokenizer over vocab_size ids."""
    if task is not None and task.get("name") == "text":
        return byte_tokenizer()
    return task_tokenizer(vocab_size)
