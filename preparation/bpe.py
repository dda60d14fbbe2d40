"""The bpe tokenizer: byte-level BPE (GPT-2's byte alphabet and pre-tokenizing) learnt by Hugging
Face tokenizers from a dataset's train split alone, so that val and test stay unseen and the leakage
audit honest."""

import sys

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from data import SPECIAL_TOKENS, BPETokenizer, DataError

BYTE_SYMBOLS = 256  # the byte-level alphabet: every text encodes, whatever the train split held
MIN_VOCAB_SIZE = BYTE_SYMBOLS + len(SPECIAL_TOKENS)


def check_vocab_size(vocab_size) -> None:
    if vocab_size is None:
        raise DataError("--tokenizer bpe learns a vocabulary of --vocab_size ids; pass one, "
                        "e.g. --vocab_size 8192")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab_size {vocab_size} is too small for what a bpe vocabulary holds "
                        f"before any merge: the {BYTE_SYMBOLS} byte symbols and the special tokens "
                        f"({', '.join(SPECIAL_TOKENS)}); pass at least {MIN_VOCAB_SIZE}")


def train_bpe(texts, vocab_size: int) -> BPETokenizer:
    """A tokenizer of at most vocab_size ids learnt from the texts (an iterable of str): the special
    tokens first, then the byte symbols, then the merges. The same texts give the same
    tokenizer.json, byte for byte."""
    backend = tokenizers.Tokenizer(models.BPE())
    # as GPT-2: text is encoded as given
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # bars are for a console; in a log they are blank lines
    )
    print(f"training a byte-level BPE tokenizer of {vocab_size:,} ids on the train split")
    backend.train_from_iterator(texts, trainer)
    tokenizer = BPETokenizer(backend.to_str())
    if tokenizer.vocab_size < vocab_size:
        print(f"the train split yields {tokenizer.vocab_size:,} ids, fewer than --vocab_size "
              f"{vocab_size:,}: it has no more pairs to merge")
    return tokenizer
