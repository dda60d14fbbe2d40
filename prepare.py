r"""Turn text into memmappable token shards for train.py: the command. The pipelines it runs are in
preparation/ (files.py, web.py, sft.py, and common.py for what they share); data.py holds the
format, meta.json and tokenizers, which training reads back without importing any of this.

    python prepare.py                    # Python's own stdlib sources, byte-level, no download
    python prepare.py shakespeare_char   # tiny shakespeare, character-level (downloaded once)
    python prepare.py text --input notes/ "docs/*.md" --tokenizer gpt2 --name notes
    python prepare.py text --input notes/ --tokenizer bpe --vocab_size 8192 --name notes
    python prepare.py fineweb10B         # FineWeb's 10B-token sample, GPT-2 BPE, streamed
    python prepare.py fineweb10B --input local/*.parquet --max_docs 10000 --val_tokens 100000

    python prepare.py sft --input data.jsonl     # fine-tuning records, GPT-2 BPE, with a loss mask

The result is <data_root>/<name>/ holding train_000000.bin, ..., val_000000.bin, ... and meta.json
(and, with --tokenizer bpe, tokenizer.json).

Split rule (deterministic): the source documents (files) are ordered by the sha256 of their path
relative to their input root (the folder given, or a file's own folder for a file given directly),
so a multi-file corpus gets a pseudo-random set of validation files that is identical on every run
and machine. The source is the concatenation of the documents in that order; its first
(1 - val_fraction) of bytes go to train and the rest to val. The document straddling the cut is
split there, with the cut moved back to a UTF-8 character boundary. For a single ASCII file this is
exactly nanoGPT's shakespeare_char split (first 90% of characters train, last 10% val). Each
document is followed by the end-of-text token when the tokenizer has one (a straddling document gets
it in val only; empty files contribute nothing, not even that token). --test_fraction t (default 0:
no test split) makes the last t of the bytes, cut the same way, test instead of val: train stays
byte for byte the same and val keeps the bytes between.

Web datasets (fineweb10B, fineweb_edu10B, openwebtext) are a stream of documents instead: from the
Hugging Face hub through the optional `datasets` package (pip install datasets), or with --input
from local files read in order of their path relative to their input root (so a local copy of the
hub's files keeps the hub's order): .jsonl (one JSON object with a "text" field per line), .parquet
(a "text" column; needs pyarrow) or any other file as one document. As in llm.c, the end-of-text
token goes BEFORE each document, even an empty one, and the first --val_tokens tokens of the stream
are val: the document that crosses that count is cut there and the rest of it dropped, so no
document is in both splits and train starts at a document. --test_tokens t (default 0: no test
split) makes the last t of those tokens test instead of val: val is the first val_tokens - t, cut
the same way, and test the documents after it up to val_tokens, the tokens dropped from val's last
document still counting, so train is the same with or without test. --max_docs stops early.

Fine-tuning records (sft): JSON Lines files, a record per line (blank lines skipped), read in order
of their path relative to their input root. A record is {"prompt": ..., "completion": ...} or
{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}. Rendering (template
"sft v1"; its one special token is the tokenizer's end-of-text, GPT-2's <|endoftext|>, EOT below):
    prompt/completion: EOT prompt completion EOT   (the texts joined as given: put any separator,
                                                    such as a newline, at the end of the prompt)
    messages:          EOT, then per message "System: {content}\n\n" or "User: {content}\n\n",
                       and for the assistant "Assistant: " {content} EOT
Text is encoded as ordinary text, so a literal "<|endoftext|>" in a record never becomes the special
token. Loss mask: the completion (or each assistant content) and the EOT after it are trained;
everything else (the opening EOT, prompts, other turns, role headers) gets target -100 in train.py.
Dropped and counted: a record with nothing to train (an empty completion; no assistant turn, or only
empty ones) and one longer than --block_size + 1 tokens (a training row is block_size + 1 tokens;
cutting a record would cut its end token or its prompt). Split: of the n records,
v = max(1, round(val_fraction * n)) spread evenly are val (Python's round: halves go to even):
record i (from 0) is val when floor((i + 1) * v / n) > floor(i * v / n). With --test_fraction,
t = max(1, round(test_fraction * n)) of those v records, spread evenly among them by the same rule,
are test instead. The split is decided before any record is dropped, so it does not depend on the
tokenizer or --block_size.
Output: {split}_tokens.npy (uint16, or uint32 as for shards), {split}_mask.npy (uint8, 1 where the
token is a trained target) and {split}_offsets.npy (int64: example i is
tokens[offsets[i]:offsets[i + 1]]) per split, and meta.json with "format": "sft".

Leakage audit: prepare hashes every document (64-bit blake2b of its bytes: verbatim matches only,
not near-duplicates) and says on the console and in meta.json's "leakage" -- {"unit", "val_docs",
"val_in_train"}, plus "test_docs" and "test_in_train" with a test split -- how many val and test
documents also occur in train. The unit: for file datasets of several files (python_stdlib) a file,
its part in the split; for a single file, which straddles the cut anyway, a paragraph, a block of
non-blank lines stripped of surrounding whitespace (one speech in tiny shakespeare); for web
datasets a document; for sft a record as rendered (its token ids). Empty documents are not counted.

Tokenizers (--tokenizer): byte, char, gpt2 (tiktoken's r50k_base, under the name meta.json has
always given it) or any encoding tiktoken knows by name (cl100k_base, o200k_base, p50k_base,
r50k_base, ..., and those of an installed tiktoken_ext plugin), from tiktoken's cache
(TIKTOKEN_CACHE_DIR), else downloaded into it once. End-of-text is the encoding's own <|endoftext|>
(meta.json's eot_id; none if the encoding lacks it). bpe learns a byte-level BPE vocabulary of
--vocab_size ids (GPT-2's byte alphabet and pre-tokenizing, Hugging Face tokenizers) from the train
split alone -- never from val or test, so the leakage audit stays honest -- for file datasets and
sft (the train records' texts as the template renders them; web data is split by token counts, so it
has no train split before tokenizing). Its ids: <|endoftext|> 0 (data.SPECIAL_TOKENS: the template
needs no other), the 256 byte symbols, then the merges. It is saved beside the shards as
tokenizer.json, which meta.json names with its sha256 (a changed file is refused) and transformers
reads; the same text gives the same file, byte for byte.

Shard format (llm.c / modded-nanogpt, so their published FineWeb shards load unchanged): a header of
256 little-endian int32 -- magic, version, token count, then zeros -- followed by the tokens: as
uint16 under magic 20240520, version 1 (llm.c's GPT-2 shards), or, for a vocabulary of more than
65,536 ids (cl100k_base, o200k_base), as uint32 under magic 20240801, version 7 (its Llama 3
shards). Shards made by llm.c or modded-nanogpt need no tokenizing: put the .bin files in
<data_root>/<name>/ and run `python prepare.py meta --name <name>`, which checks every shard's
header and writes a meta.json saying they hold GPT-2 tokens (--tokenizer names another).
"""

import inspect
import sys
import time
from pathlib import Path

from configurator import ArgumentParser
from data import (
    MAX_SHARD_TOKENS,
    DataError,
    has_split,
    leaked_documents,
    load_shard,
    shard_paths,
    write_meta,
)
from preparation.bpe import check_vocab_size
from preparation.common import dataset_meta, tokenizer_without_source
from preparation.files import DOWNLOADED, prepare_files
from preparation.sft import DEFAULT_SFT_BLOCK_SIZE, prepare_sft
from preparation.web import DEFAULT_VAL_TOKENS, WEB_DATASETS, prepare_stream

DEFAULT_TOKENIZER = {
    "python_stdlib": "byte", "text": "byte",
    **{name: tokenizer for name, (_, _, tokenizer) in DOWNLOADED.items()},
    **dict.fromkeys(WEB_DATASETS, "gpt2"), "sft": "gpt2",
}
DEFAULT_VAL_FRACTION = 0.1


def _check_options(dataset: str, val_fraction, test_fraction, shard_tokens: int, val_tokens,
                   test_tokens, max_docs, block_size) -> None:
    if dataset not in DEFAULT_TOKENIZER:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DEFAULT_TOKENIZER)}"
                        " (or meta)")
    if block_size is not None and (dataset != "sft" or block_size < 1):
        raise DataError(f"--block_size is for sft only and must be at least 1, not {block_size}"
                        f" for {dataset}")
    if dataset in WEB_DATASETS and (val_fraction, test_fraction) != (None, None):
        raise DataError(f"{dataset} takes the first --val_tokens tokens as val (and --test_tokens"
                        " of them as test), so drop --val_fraction and --test_fraction")
    if dataset not in WEB_DATASETS and (val_tokens, test_tokens, max_docs) != (None, None, None):
        raise DataError(f"--val_tokens, --test_tokens and --max_docs are for the web datasets"
                        f" ({', '.join(WEB_DATASETS)}) only; file datasets take --val_fraction"
                        " and --test_fraction")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction must be strictly between 0 and 1, not {val_fraction};"
                        " 0.1 is typical")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"--shard_tokens must be between 1 and {MAX_SHARD_TOKENS:,},"
                        f" not {shard_tokens:,}")
    for option, value in (("--val_tokens", val_tokens), ("--max_docs", max_docs)):
        if value is not None and value < 1:
            raise DataError(f"{option} must be at least 1, not {value:,}")
    if test_fraction is not None and not 0 <= test_fraction < 1:
        raise DataError(f"--test_fraction must be at least 0 (off) and below 1,"
                        f" not {test_fraction}")
    if test_tokens is not None and test_tokens < 0:
        raise DataError(f"--test_tokens must be at least 0 (off), not {test_tokens:,}")
    for unit, test, val in (("fraction", test_fraction, val_fraction or DEFAULT_VAL_FRACTION),
                            ("tokens", test_tokens, val_tokens or DEFAULT_VAL_TOKENS)):
        if test and test >= val:
            raise DataError(f"--test_{unit} {test:,} must be below --val_{unit} {val:,}: test is"
                            " the last part of what val holds out, so that train stays the same;"
                            f" raise --val_{unit} to hold out both")


def prepare(
    dataset="python_stdlib",
    inputs=None,
    tokenizer=None,
    data_root="data",
    name=None,
    val_fraction=None,
    test_fraction=None,
    shard_tokens=100_000_000,
    val_tokens=None,
    test_tokens=None,
    max_docs=None,
    block_size=None,
    vocab_size=None,
) -> Path:
    """Tokenize a dataset into shards and meta.json in <data_root>/<name>/ and return that folder.

    val_fraction (default 0.1) and test_fraction (default 0, no test split) split the file datasets
    and sft; val_tokens (default 100M), test_tokens (default 0) and max_docs are for web datasets;
    block_size (default 1024) is for sft; vocab_size is for (and needed by) tokenizer bpe."""
    started = time.perf_counter()
    _check_options(dataset, val_fraction, test_fraction, shard_tokens, val_tokens, test_tokens,
                   max_docs, block_size)
    tokenizer_name = tokenizer or DEFAULT_TOKENIZER[dataset]
    if tokenizer_name != "bpe" and vocab_size is not None:
        raise DataError("--vocab_size is the size of the vocabulary that --tokenizer bpe learns;"
                        f" {tokenizer_name} has its own, so drop it")
    if tokenizer_name == "bpe" and dataset not in WEB_DATASETS:  # web data refuses bpe (common.py)
        check_vocab_size(vocab_size)
    out_dir = Path(data_root) / (name or dataset)
    val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if dataset == "sft":
        meta = prepare_sft(out_dir, inputs, tokenizer_name, vocab_size, val_fraction,
                           test_fraction or 0, block_size or DEFAULT_SFT_BLOCK_SIZE)
    elif dataset in WEB_DATASETS:
        val_tokens = DEFAULT_VAL_TOKENS if val_tokens is None else val_tokens
        meta = prepare_stream(out_dir, dataset, inputs, tokenizer_name, shard_tokens, val_tokens,
                              test_tokens or 0, max_docs, started)
    else:
        meta = prepare_files(out_dir, dataset, inputs, tokenizer_name, vocab_size, data_root,
                             val_fraction, test_fraction or 0, shard_tokens, started)
    seconds = time.perf_counter() - started
    tokens = " + ".join(f"{count:,} {split}" for split, count in meta["tokens"].items())
    print(f"{out_dir}: {tokens} tokens in {seconds:.1f}s"
          f" ({meta['source_bytes'] / 1e6 / seconds:.1f} MB/s)")
    _report_leakage(meta)
    return out_dir


def _report_leakage(meta: dict) -> None:
    leakage = meta["leakage"]
    held_out = " and ".join(f"{leakage[f'{split}_in_train']:,} of {leakage[f'{split}_docs']:,}"
                            f" {split}" for split in ("val", "test") if f"{split}_docs" in leakage)
    warning = "warning: " if leaked_documents(meta) else ""
    print(f"{warning}leakage audit: {held_out} {leakage['unit']}s also occur verbatim in train")


def describe_shards(data_dir, tokenizer="gpt2") -> dict:
    """Write meta.json for shards made elsewhere (llm.c, modded-nanogpt), checking every header."""
    data_dir = Path(data_dir)
    tok = tokenizer_without_source(tokenizer)
    splits = ["train", "val", "test"] if has_split(data_dir, "test") else ["train", "val"]
    tokens = {split: sum(len(load_shard(path)) for path in shard_paths(data_dir, split))
              for split in splits}
    meta = dataset_meta(data_dir.name, tokenizer, tok, tokens=tokens)
    write_meta(data_dir, meta)
    counts = " + ".join(f"{count:,} {split}" for split, count in tokens.items())
    print(f"{data_dir / 'meta.json'}: {counts} {tokenizer} tokens")
    return meta


def _parser() -> ArgumentParser:
    parser = ArgumentParser(description="Tokenize text into llm.c-format token shards"
                            " in <data_root>/<name>/.")
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(prepare).parameters.items()}
    downloads = " ".join(f"{name}: {about}, downloaded once unless --input is given;"
                         for name, (about, _, _) in DOWNLOADED.items())
    parser.add_argument(
        "dataset",
        nargs="?",
        default=defaults["dataset"],
        help="python_stdlib: Python's own standard library sources, no download;"
        f" {downloads} text: your files via --input;"
        f" {', '.join(WEB_DATASETS)}: web text streamed from the Hugging Face hub"
        " (pip install datasets) unless --input is given; sft: fine-tuning records (JSON Lines of"
        " prompt/completion or messages) with a loss mask; meta: write meta.json for llm.c-format"
        " shards already in <data_root>/<name>/"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        metavar="PATH",
        help="files, folders (every non-hidden file, recursively) or glob patterns to read; for web"
        " datasets .jsonl (a text field per line), .parquet (a text column) or other files (one"
        " document each)"
        " (default: the dataset's own)",
    )
    parser.add_argument(
        "--tokenizer",
        help="byte, char, bpe (learnt from the train split: file datasets and sft; needs"
        " --vocab_size), gpt2 or any tiktoken encoding name (cl100k_base, o200k_base, ...: from"
        " tiktoken's cache, TIKTOKEN_CACHE_DIR, else downloaded once) (default: char for"
        " shakespeare_char, gpt2 for web datasets, sft and meta, else byte)",
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        help="--tokenizer bpe: the ids to learn, end-of-text and the 256 byte symbols included"
        " (at least 257); a small text may give fewer",
    )
    parser.add_argument(
        "--data_root", default=defaults["data_root"],
        help="folder of prepared datasets (default: %(default)s)",
    )
    parser.add_argument("--name",
                        help="output folder name under --data_root (default: the dataset name)")
    parser.add_argument(
        "--val_fraction",
        type=float,
        help="fraction of source bytes, taken from the end, that becomes the val split (sft: of"
        f" records, spread evenly); not for web datasets (default: {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument(
        "--test_fraction",
        type=float,
        help="fraction of source bytes, taken from the very end, that becomes a test split; it is"
        " carved out of --val_fraction, so train stays the same and val keeps the rest (sft: of the"
        " val records, spread evenly); not for web datasets (default: 0, no test split)",
    )
    parser.add_argument(
        "--val_tokens",
        type=int,
        help="web datasets: the stream's first this many tokens become the val split"
        f" (default: {DEFAULT_VAL_TOKENS})",
    )
    parser.add_argument(
        "--test_tokens",
        type=int,
        help="web datasets: the last this many of the --val_tokens tokens become a test split, so"
        " train stays the same and val keeps the rest (default: 0, no test split)",
    )
    parser.add_argument("--max_docs", type=int,
                        help="web datasets: stop after this many documents (default: all)")
    parser.add_argument(
        "--block_size",
        type=int,
        help="sft: drop records longer than this + 1 tokens, train.py's row length at this"
        f" block_size (default: {DEFAULT_SFT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--shard_tokens", type=int, default=defaults["shard_tokens"],
        help="tokens per shard file (default: %(default)s)",
    )
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.dataset != "meta":
            prepare(**vars(args))
        elif args.name:
            describe_shards(Path(args.data_root) / args.name, args.tokenizer or "gpt2")
        else:
            raise DataError("meta needs --name, the folder under --data_root that holds the shards")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
