r"""Turn text into memmappable token shards for train.py.

    python prepare.py                    # Python's own standard library sources, byte-level, no download
    python prepare.py shakespeare_char   # tiny shakespeare, character-level (downloaded once)
    python prepare.py text --input notes/ "docs/*.md" --tokenizer gpt2 --name notes
    python prepare.py fineweb10B         # FineWeb's 10B-token sample, GPT-2 BPE, streamed (pip install datasets)
    python prepare.py fineweb10B --input local/*.parquet --max_docs 10000 --val_tokens 100000

    python prepare.py sft --input data.jsonl     # fine-tuning records, GPT-2 BPE, with a loss mask

The result is <data_root>/<name>/ holding train_000000.bin, ..., val_000000.bin, ... and meta.json.

Split rule (deterministic): the source documents (files) are ordered by the sha256 of their path
relative to their input root (the folder given, or a file's own folder for a file given directly),
so a multi-file corpus gets a pseudo-random set of validation files that is identical on every run
and machine. The source is the concatenation of the documents in that order; its first
(1 - val_fraction) of bytes go to train and the rest to val. The document straddling the cut is
split there, with the cut moved back to a UTF-8 character boundary. For a single ASCII file this is
exactly nanoGPT's shakespeare_char split (first 90% of characters train, last 10% val). Each
document is followed by the end-of-text token when the tokenizer has one (a straddling document
gets it in val only; empty files contribute nothing, not even that token).

Web datasets (fineweb10B, fineweb_edu10B, openwebtext) are a stream of documents instead: from the
Hugging Face hub through the optional `datasets` package, or with --input from local files read in
order of their path relative to their input root (so a local copy of the hub's files keeps the hub's
order): .jsonl (one JSON object with a "text" field per line), .parquet (a "text" column; needs
pyarrow) or any other file as one document. As in llm.c, the end-of-text token goes BEFORE each
document, even an empty one, and the first --val_tokens tokens of the stream are val: the document
that crosses that count is cut there and the rest of it dropped, so no document is in both splits
and train starts at a document. --max_docs stops early.

Fine-tuning records (sft): JSON Lines files, one record per line (blank lines skipped), read in order of
their path relative to their input root. A record is {"prompt": ..., "completion": ...} or
{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}. Rendering (template "sft v1";
its only special token is the tokenizer's end-of-text, <|endoftext|> in GPT-2, written EOT here):
    prompt/completion: EOT prompt completion EOT       (the texts joined as given: put any separator,
                                                        such as a newline, at the end of the prompt)
    messages:          EOT, then per message "System: {content}\n\n" or "User: {content}\n\n", and for
                       the assistant "Assistant: " {content} EOT
Text is encoded as ordinary text, so a literal "<|endoftext|>" in a record never becomes the special token.
Loss mask: the completion (or each assistant content) and the EOT after it are trained; everything else
(the opening EOT, prompts, other turns, role headers) gets target -100 in train.py. Dropped and counted: a
record with nothing to train (an empty completion; no assistant turn, or only empty ones) and one longer
than --block_size + 1 tokens (a training row is block_size + 1 tokens; cutting a record would cut its end
token or its prompt). Split: of the n records, v = max(1, round(val_fraction * n)) spread evenly are val
(Python's round: halves go to even): record i (from 0) is val when floor((i + 1) * v / n) > floor(i * v / n).
The split is decided before any record is dropped, so it does not depend on the tokenizer or --block_size.
Output: {split}_tokens.npy (uint16), {split}_mask.npy (uint8, 1 where the token is a trained target) and
{split}_offsets.npy (int64: example i is tokens[offsets[i]:offsets[i + 1]]) per split, and meta.json with
"format": "sft".

Shard format (llm.c / modded-nanogpt, so their published FineWeb shards load unchanged): a header
of 256 little-endian int32 -- magic 20240520, version 1, token count, then zeros -- followed by the
tokens as uint16. Shards made by llm.c or modded-nanogpt (e.g. their published FineWeb ones) need
no tokenizing: put the .bin files in <data_root>/<name>/ and run `python prepare.py meta --name
<name>`, which checks every shard's header and writes a meta.json saying they hold GPT-2 tokens
(--tokenizer names another).
"""

import argparse
import contextlib
import glob
import hashlib
import http.client
import inspect
import itertools
import json
import os
import shutil
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np

from data import (
    MAX_SHARD_TOKENS,
    MAX_VOCAB,
    DataError,
    Tokenizer,
    get_tokenizer,
    load_shard,
    shard_paths,
    tokenizer_meta,
    write_shard,
)

CHUNK_BYTES = 2 << 20  # read size; small enough that memory stays flat on any input size
BATCH_BYTES = CHUNK_BYTES * (os.cpu_count() or 1)  # enough chunks to keep every core busy
WEB_DATASETS = {  # name: (Hugging Face hub repository, config), streamed unless --input names local files
    "fineweb10B": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb_edu10B": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "openwebtext": ("Skylion007/openwebtext", None),
}
DEFAULT_TOKENIZER = {
    "python_stdlib": "byte", "shakespeare_char": "char", "text": "byte", **dict.fromkeys(WEB_DATASETS, "gpt2"),
    "sft": "gpt2",
}
DEFAULT_SFT_BLOCK_SIZE = 1024  # GPT-2's context
SFT_TEMPLATE = "sft v1"  # the rendering in the module docstring
SFT_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_VAL_TOKENS = 100_000_000  # llm.c's convention for web data: the stream's first 100M tokens are val
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DOWNLOAD_CACHE = "input.txt"  # a downloaded source kept inside its dataset folder
STDLIB_SKIPPED_FOLDERS = {"site-packages", "test", "tests", "idle_test"}


# ---- finding the source documents --------------------------------------------------------------


def _source_documents(dataset: str, inputs, data_root) -> list[Path]:
    """The dataset's files in split order: by sha256 of the path relative to their input root."""
    if dataset == "python_stdlib":
        if inputs:
            raise DataError("python_stdlib reads Python's own standard library, so drop --input or use `text`")
        files = _stdlib_files()
    elif inputs:
        files = _input_files(inputs)
    elif dataset == "shakespeare_char":
        files = {_shakespeare_file(data_root).resolve(): DOWNLOAD_CACHE}
    else:
        raise DataError("the text dataset needs input: pass --input with files, folders or glob patterns")
    return sorted(files, key=lambda path: (hashlib.sha256(files[path].encode()).hexdigest(), path))


def _stdlib_files() -> dict[Path, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return _files_under(root, lambda folder: folder not in STDLIB_SKIPPED_FOLDERS, lambda name: name.endswith(".py"))


def _input_files(inputs) -> dict[Path, str]:
    """Files named by --input, each keyed by its path relative to its input root; duplicates merge."""
    files = {}
    for spec in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        for path in _expand(str(spec)):
            if path.is_dir():
                found = _files_under(path, _is_visible, _is_visible)
                if not found:
                    raise DataError(f"folder {path} holds no files (hidden ones are skipped); pass one with text")
            elif path.is_file():
                found = {path: path.name}
            else:
                raise DataError(f"input {path} is not a regular file or folder; pass files, folders or glob patterns")
            files.update({found_path.resolve(): key for found_path, key in found.items()})
    return files


def _expand(spec: str) -> list[Path]:
    if Path(spec).exists():
        return [Path(spec)]
    if not any(wildcard in spec for wildcard in "*?["):
        raise DataError(f"input path {spec} does not exist; pass an existing file, folder or glob pattern")
    matches = sorted(glob.glob(spec, recursive=True))
    if not matches:
        raise DataError(f"input pattern {spec!r} matched nothing; check it, and quote it to keep it from the shell")
    return [Path(match) for match in matches]


def _is_visible(name: str) -> bool:
    return not name.startswith(".")


def _files_under(root: Path, keep_folder, keep_file) -> dict[Path, str]:
    """Regular files below root, keyed by relative path; pruned folders are never walked."""
    files = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if keep_folder(name)]
        for name in names:
            path = Path(folder, name)
            if keep_file(name) and path.is_file():
                files[path] = path.relative_to(root).as_posix()
    return files


def _shakespeare_file(data_root) -> Path:
    path = Path(data_root) / "shakespeare_char" / DOWNLOAD_CACHE
    if not path.is_file():
        _download(SHAKESPEARE_URL, path)
    return path


def _download(url: str, path: Path) -> None:
    print(f"downloading {url} to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download tiny shakespeare ({e}); pass --input PATH to a local copy") from None


# ---- splitting and reading ---------------------------------------------------------------------


def _plan_splits(documents: list[Path], val_fraction: float) -> tuple[int, dict[str, list[tuple]]]:
    """Source size and, per split, its (path, start, end, ends_document) byte segments."""
    sizes = [path.stat().st_size for path in documents]
    total = sum(sizes)
    if total == 0:
        raise DataError("the input text is empty (0 bytes); pass files that contain text")
    cut = _character_start(documents, sizes, int(total * (1 - val_fraction)))
    if not 0 < cut < total:
        raise DataError(
            f"the source ({total:,} bytes) is too small to give both train and val text at --val_fraction"
            f" {val_fraction}; use more text or another --val_fraction"
        )
    return total, {"train": _segments(documents, sizes, 0, cut), "val": _segments(documents, sizes, cut, total)}


def _character_start(documents: list[Path], sizes: list[int], cut: int) -> int:
    """Move a source byte offset back to the start of the UTF-8 character it falls in."""
    offset = 0
    for path, size in zip(documents, sizes):
        if offset < cut < offset + size:
            inside = cut - offset
            lookback = min(inside, 3)  # a UTF-8 character has at most 3 continuation bytes
            with open(path, "rb") as f:
                f.seek(inside - lookback)
                window = f.read(lookback + 1)
            back = 0
            while back < lookback and window[-1 - back] & 0xC0 == 0x80:
                back += 1
            return cut - back
        offset += size
    return cut


def _segments(documents: list[Path], sizes: list[int], low: int, high: int) -> list[tuple]:
    """The parts of the documents inside source bytes [low, high), with whether each document ends there."""
    segments = []
    offset = 0
    for path, size in zip(documents, sizes):
        start, end = max(low, offset), min(high, offset + size)
        if start < end:
            segments.append((path, start - offset, end - offset, offset + size <= high))
        offset += size
    return segments


def _read_chunks(path: Path, start: int, end: int):
    """Yield path's bytes [start, end) in pieces of about CHUNK_BYTES, cut so no line (for BPE) or
    character (for decoding) is split, except at `end` itself."""
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        carry = b""
        while left:
            block = f.read(min(CHUNK_BYTES, left))
            if not block:
                raise DataError(f"{path} got shorter while being read; rerun prepare once nothing writes to it")
            left -= len(block)
            data = carry + block
            cut = _chunk_end(data) if left else len(data)
            carry = data[cut:]
            if cut:
                yield data[:cut]


def _chunk_end(data: bytes) -> int:
    """After the last newline, else before the last character (it may be incomplete)."""
    newline = data.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    for i in range(len(data) - 1, max(len(data) - 5, -1), -1):
        if data[i] & 0xC0 != 0x80:
            return i
    return len(data)


def _as_text(chunk: bytes, path: Path) -> str:
    try:
        return chunk.decode()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e.reason}); leave it out of --input or use --tokenizer byte") from None


def _source_chars(documents: list[Path]) -> str:
    """The char tokenizer's vocabulary: every distinct character of the source (one extra read)."""
    chars = set()
    for path in documents:
        for chunk in _read_chunks(path, 0, path.stat().st_size):
            chars.update(_as_text(chunk, path))
    return "".join(sorted(chars))


def _build_tokenizer(name: str, documents: list[Path]) -> Tokenizer:
    chars = _source_chars(documents) if name == "char" else None
    tokenizer = get_tokenizer({"tokenizer": name, "chars": chars})
    if tokenizer.vocab_size > MAX_VOCAB:
        raise DataError(
            f"tokenizer {name!r} has {tokenizer.vocab_size:,} ids, more than the {MAX_VOCAB:,} that fit"
            " uint16 shards; use gpt2 or another smaller tokenizer"
        )
    return tokenizer


# ---- tokenizing and writing --------------------------------------------------------------------


def _split_tokens(segments: list[tuple], tokenizer: Tokenizer, source_hash):
    """Token arrays of one split in source order, with end-of-text after each document ending in it."""
    eot = None if tokenizer.eot_id is None else np.array([tokenizer.eot_id], dtype=np.uint16)
    batch, batch_bytes = [], 0  # chunks, and the eot array where a document ends
    for path, start, end, ends_document in segments:
        for chunk in _read_chunks(path, start, end):
            source_hash.update(chunk)
            batch.append(_as_text(chunk, path) if tokenizer.reads_text else chunk)
            batch_bytes += len(chunk)
            if batch_bytes >= BATCH_BYTES:
                yield from _encode_batch(batch, tokenizer)
                batch, batch_bytes = [], 0
        if ends_document and eot is not None:
            batch.append(eot)
    yield from _encode_batch(batch, tokenizer)


def _encode_batch(batch: list, tokenizer: Tokenizer):
    """Tokenize a batch's chunks in one call; the eot arrays between them pass through in place."""
    encoded = iter(tokenizer.encode_chunks([item for item in batch if not isinstance(item, np.ndarray)]))
    for item in batch:
        yield item if isinstance(item, np.ndarray) else next(encoded)


class _ShardWriter:
    """Packs token arrays into a preallocated buffer and writes it out as a shard whenever it fills."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, started: float, log=print):
        self.folder, self.split, self.started, self.log = folder, split, started, log
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0
        self.shards = 0
        self.tokens = 0  # added so far, written or not

    def add(self, tokens: np.ndarray) -> None:
        self.tokens += len(tokens)
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        path = self.folder / f"{self.split}_{self.shards:06d}.bin"
        write_shard(path, self.buffer[: self.filled])
        self.log(f"  {path.name}: {self.filled:,} tokens ({time.perf_counter() - self.started:.1f}s)")
        self.shards += 1
        self.filled = 0


def _write_splits(folder: Path, splits: dict, tokenizer: Tokenizer, shard_tokens: int, started: float):
    """Shards for every split; returns the token counts and the sha256 of the source read on the way."""
    source_hash = hashlib.sha256()
    tokens = {}
    for split, segments in splits.items():
        writer = _ShardWriter(folder, split, shard_tokens, started)
        for array in _split_tokens(segments, tokenizer, source_hash):
            writer.add(array)
        writer.flush()
        tokens[split] = writer.tokens
    return tokens, source_hash.hexdigest()


@contextlib.contextmanager
def _new_folder(out_dir: Path):
    """A temporary sibling folder to fill, swapped in for out_dir if the block succeeds, else deleted."""
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        yield tmp_dir
        _replace_folder(out_dir, tmp_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # gone already after a successful swap


def _replace_folder(target: Path, new: Path) -> None:
    """Swap new in for target; whatever fails, complete data stays under one of the two names."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        cached_download = target / DOWNLOAD_CACHE
        if cached_download.is_file() and not (new / DOWNLOAD_CACHE).exists():
            shutil.copy2(cached_download, new / DOWNLOAD_CACHE)
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / f".meta.json.tmp-{os.getpid()}"  # then renamed, so meta.json is never half-written
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / "meta.json")


# ---- web-scale datasets: a stream of documents -------------------------------------------------


def _hub_documents(dataset: str):
    """The dataset's texts, streamed from the Hugging Face hub in the hub's order."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"streaming {dataset} needs `pip install datasets`, or pass --input with local files") from None
    return _hub_texts(datasets, *WEB_DATASETS[dataset])


def _hub_texts(datasets, repository: str, config):
    try:
        for record in datasets.load_dataset(repository, config, split="train", streaming=True):
            yield record["text"]
    except Exception as e:  # the hub client raises many unrelated types (OSError, httpx, RuntimeError, ...)
        raise DataError(
            f"could not stream {repository} from the Hugging Face hub ({e}); download its files and pass --input"
        ) from e


def _local_documents(files: list[Path]):
    """The texts in the files, in order, each checked to be a string."""
    for path in files:
        try:
            for text in _file_texts(path):
                if not isinstance(text, str):
                    raise DataError(f"{path} has a text of type {type(text).__name__}, not str; fix or drop it")
                yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 ({e.reason}); convert it or leave it out of --input") from None


def _file_texts(path: Path):
    """A .jsonl file's "text" fields, a .parquet file's "text" column, else the whole file as one text."""
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    if path.suffix == ".parquet":
        return _parquet_texts(path)
    return [path.read_bytes().decode()]  # from bytes, so line ends stay as they are


def _jsonl_texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):  # not JSON, no "text", not an object
                    raise DataError(f"line {number} of {path} is not a JSON object with a text field; fix it") from None


def _parquet_texts(path: Path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"reading {path} needs `pip install pyarrow`, or convert it to .jsonl") from None
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as e:
        raise DataError(f"{path} is not a readable parquet file ({e}); fix it or leave it out of --input") from None
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no text column, only {', '.join(parquet.schema_arrow.names)}; pass files with one")
    for batch in parquet.iter_batches(columns=["text"]):
        yield from batch.column("text").to_pylist()


def _document_batches(documents):
    """Documents in lists of about BATCH_BYTES characters: enough to keep every core busy, little memory."""
    batch, size = [], 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _document_tokens(documents, tokenizer: Tokenizer):
    """(UTF-8 text, tokens led by end-of-text as in llm.c) per document, tokenized a batch at a time on all cores."""
    eot = np.array([tokenizer.eot_id], dtype=np.uint16)
    for batch in _document_batches(documents):
        encoded = [text.encode() for text in batch]
        for data, tokens in zip(encoded, tokenizer.encode_chunks(batch if tokenizer.reads_text else encoded)):
            yield data, np.concatenate([eot, tokens])


def _write_stream(folder: Path, documents, tokenizer: Tokenizer, shard_tokens: int, val_tokens: int, started) -> dict:
    """Val shards of the stream's first val_tokens tokens, then train shards; returns meta's counts."""
    progress = _Progress()
    writers = {split: _ShardWriter(folder, split, shard_tokens, started, progress.log) for split in ("train", "val")}
    documents_per_split = {"train": 0, "val": 0}
    source_hash, source_bytes = hashlib.sha256(), 0
    for data, tokens in _document_tokens(documents, tokenizer):
        source_hash.update(data)
        source_bytes += len(data)
        split = "val" if writers["val"].tokens < val_tokens else "train"
        if split == "val":
            tokens = tokens[: val_tokens - writers["val"].tokens]  # the rest of the crossing document is dropped
        writers[split].add(tokens)
        if split == "val" and writers["val"].tokens == val_tokens:
            writers["val"].flush()  # val is complete: write it now rather than after all of train
        documents_per_split[split] += 1
        progress.update(documents_per_split, writers)
    if not documents_per_split["train"]:
        raise DataError(
            f"the documents give {writers['val'].tokens:,} tokens, none left for train after --val_tokens"
            f" {val_tokens:,}; use more documents or a smaller --val_tokens"
        )
    for writer in writers.values():
        writer.flush()
    progress.update(documents_per_split, writers, done=True)
    tokens = {split: writer.tokens for split, writer in writers.items()}
    return {"tokens": tokens, "documents": documents_per_split, "source_bytes": source_bytes,
            "source_sha256": source_hash.hexdigest()}


class _Progress:
    """A status line redrawn in place about once a second; log prints a message over it."""

    def __init__(self):
        self.started = self.shown = time.perf_counter()
        self.width = 0  # of the status line on screen, which the next print must cover

    def update(self, documents: dict, writers: dict, done=False) -> None:
        now = time.perf_counter()
        if done or now - self.shown >= 1:
            self.shown, seconds = now, max(now - self.started, 1e-9)
            docs, tokens = sum(documents.values()), sum(writer.tokens for writer in writers.values())
            shards = sum(writer.shards for writer in writers.values())
            rates = f"{docs:,} docs ({docs / seconds:,.0f}/s), {tokens:,} tokens ({tokens / seconds:,.0f}/s)"
            self.log(f"{rates}, {shards} shards written", end="\n" if done else "")

    def log(self, message: str, end="\n") -> None:
        print("\r" + message.ljust(self.width), end=end, flush=True)
        self.width = 0 if end else len(message)


def _tokenizer_without_source(name: str) -> Tokenizer:
    """A tokenizer that needs nothing from the source up front: any but char."""
    if name == "char":
        raise DataError("the char tokenizer takes its vocabulary from a whole source, not a stream; use gpt2 or byte")
    return _build_tokenizer(name, [])


def describe_shards(data_dir, tokenizer="gpt2") -> dict:
    """Write meta.json for shards made elsewhere (llm.c, modded-nanogpt), after checking every shard's header."""
    data_dir = Path(data_dir)
    tok = _tokenizer_without_source(tokenizer)
    tokens = {split: sum(len(load_shard(path)) for path in shard_paths(data_dir, split)) for split in ("train", "val")}
    meta = _meta(data_dir.name, tokenizer, tok, tokens=tokens)
    _write_meta(data_dir, meta)
    print(f"{data_dir / 'meta.json'}: {tokens['train']:,} train + {tokens['val']:,} val {tokenizer} tokens")
    return meta


# ---- fine-tuning records (sft) -----------------------------------------------------------------


def _sft_records(files: list[Path]):
    """(where, record) for every non-blank line of the JSON Lines files, where = "file:line"."""
    for path in files:
        with open(path, "rb") as f:  # bytes, decoded per line, so a line that is not UTF-8 can be named
            for number, line in enumerate(f, 1):
                where = f"{path}:{number}"
                try:
                    text = line.decode("utf-8-sig")  # -sig: a byte order mark (some editors write one) is skipped
                except UnicodeDecodeError as e:
                    raise DataError(f"{where} is not UTF-8 ({e.reason}); save the file as UTF-8") from None
                if text.strip():
                    try:
                        yield where, json.loads(text)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where} is not a JSON object ({e.msg}); write one record per line") from None


def _render(record, tokenizer: Tokenizer, where: str):
    """(token ids, loss mask) of one record by the template in the module docstring; None if nothing trains."""
    if not isinstance(record, dict) or ("messages" in record) == ("prompt" in record or "completion" in record):
        raise DataError(f"{where} needs either prompt and completion or messages (not both); see prepare.py's doc")
    ids, mask, answers = list(tokenizer.document_start()), [0], []

    def add(text, trained):
        new = tokenizer.encode(text)
        ids.extend(new)
        mask.extend([trained] * len(new))

    def answer(text):
        add(text, 1)
        ids.append(tokenizer.eot_id)
        mask.append(1)
        answers.append(text)

    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list):
            raise DataError(f"{where}: messages must be a list of {{role, content}} objects")
        for turn in turns:
            role = turn.get("role") if isinstance(turn, dict) else None
            if role not in SFT_HEADERS:
                raise DataError(f"{where}: unknown role {role!r}; use system, user or assistant")
            content = _record_text(turn.get("content"), where, f"{role} content")
            if role == "assistant":
                add(SFT_HEADERS[role], 0)
                answer(content)
            else:
                add(f"{SFT_HEADERS[role]}{content}\n\n", 0)
    else:
        if "prompt" not in record or "completion" not in record:
            raise DataError(f"{where} needs both prompt and completion")
        add(_record_text(record["prompt"], where, "prompt"), 0)
        answer(_record_text(record["completion"], where, "completion"))
    return (ids, mask) if any(answers) else None  # an empty answer would train only its end token


def _record_text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, not {type(value).__name__}")
    try:
        value.encode()  # a JSON escape like "\ud800" gives a lone surrogate, which is not text
    except UnicodeEncodeError:
        raise DataError(f"{where}: {what} holds a lone surrogate (an escape like \\ud800); fix that escape") from None
    return value


def _val_records(n: int, val_fraction: float) -> np.ndarray:
    """Which of n records are val: v = max(1, round(val_fraction * n)) of them, spread evenly."""
    v = max(1, round(val_fraction * n))
    i = np.arange(n)
    return (i + 1) * v // n > i * v // n


def _prepare_sft(out_dir: Path, inputs, tokenizer_name: str, val_fraction: float, block_size: int) -> dict:
    files = _input_files(inputs or [])
    files = sorted(files, key=lambda path: (files[path], path))
    if not files:
        raise DataError("sft needs --input: JSON Lines files of prompt/completion or messages records")
    _check_inputs_survive(files, out_dir)
    tok = _tokenizer_without_source(tokenizer_name)
    if tok.eot_id is None:
        raise DataError(f"tokenizer {tokenizer_name} has no end-of-text token to end completions; use gpt2 or byte")
    records = list(_sft_records(files))
    if len(records) < 2:
        raise DataError(f"{len(records)} record(s) in the input; sft needs at least 2 (one train, one val)")
    is_val = _val_records(len(records), val_fraction)
    if is_val.all():
        raise DataError(f"--val_fraction {val_fraction} leaves no train record of {len(records)}; lower it")
    kept = {"train": [], "val": []}
    dropped = {"nothing_to_train": 0, "too_long": 0}
    for (where, record), val in zip(records, is_val):
        example = _render(record, tok, where)
        if example is None:
            dropped["nothing_to_train"] += 1
        elif len(example[0]) > block_size + 1:
            dropped["too_long"] += 1
        else:
            kept["val" if val else "train"].append(example)
    for split, examples in kept.items():
        if not examples:
            raise DataError(f"no {split} example is left after dropping {dropped}; add records or raise --block_size")
    with _new_folder(out_dir) as folder:
        counts = {split: _write_sft_split(folder, split, examples) for split, examples in kept.items()}
        source_hash = hashlib.sha256()
        for path in files:
            source_hash.update(path.read_bytes())
        meta = _meta("sft", tokenizer_name, tok, format="sft", template=SFT_TEMPLATE, block_size=block_size,
                     examples={split: c[0] for split, c in counts.items()},
                     tokens={split: c[1] for split, c in counts.items()},
                     trained_tokens={split: c[2] for split, c in counts.items()},
                     max_example_tokens=max(len(ids) for examples in kept.values() for ids, _ in examples),
                     dropped=dropped, source_bytes=sum(path.stat().st_size for path in files),
                     source_sha256=source_hash.hexdigest(), val_fraction=val_fraction)
        meta["shard_format"] = "sft npy v1"
        _write_meta(folder, meta)
    print(f"sft: {len(records):,} records -> {counts['train'][0]:,} train + {counts['val'][0]:,} val examples; "
          f"dropped {dropped['too_long']:,} longer than block_size + 1 = {block_size + 1} tokens and "
          f"{dropped['nothing_to_train']:,} with nothing to train")
    return meta


def _write_sft_split(folder: Path, split: str, examples: list) -> tuple[int, int, int]:
    """Write a split's three arrays; (examples, tokens, trained tokens)."""
    ids = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids, _ in examples])
    mask = np.concatenate([np.asarray(mask, dtype=np.uint8) for _, mask in examples])
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in examples])]).astype(np.int64)
    for name, array in (("tokens", ids), ("mask", mask), ("offsets", offsets)):
        np.save(folder / f"{split}_{name}.npy", array)
    return len(examples), len(ids), int(mask.sum())


# ---- the pipeline ------------------------------------------------------------------------------


def _check_options(dataset: str, val_fraction, shard_tokens: int, val_tokens, max_docs, block_size) -> None:
    if dataset not in DEFAULT_TOKENIZER:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DEFAULT_TOKENIZER)} (or meta)")
    if block_size is not None and (dataset != "sft" or block_size < 1):
        raise DataError(f"--block_size is for sft only and must be at least 1, not {block_size} for {dataset}")
    if dataset in WEB_DATASETS and val_fraction is not None:
        raise DataError(f"{dataset} takes the first --val_tokens tokens as val, so drop --val_fraction")
    if dataset not in WEB_DATASETS and (val_tokens, max_docs) != (None, None):
        raise DataError(f"--val_tokens and --max_docs are for the web datasets ({', '.join(WEB_DATASETS)}) only")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction must be strictly between 0 and 1, not {val_fraction}; 0.1 is typical")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"--shard_tokens must be between 1 and {MAX_SHARD_TOKENS:,}, not {shard_tokens:,}")
    for option, value in (("--val_tokens", val_tokens), ("--max_docs", max_docs)):
        if value is not None and value < 1:
            raise DataError(f"{option} must be at least 1, not {value:,}")


def _check_inputs_survive(documents: list[Path], out_dir: Path) -> None:
    """Inputs inside the folder being replaced would be deleted with it (only the download cache is kept)."""
    out_dir = out_dir.resolve()
    for path in documents:
        if path.is_relative_to(out_dir) and path != out_dir / DOWNLOAD_CACHE:
            raise DataError(
                f"input {path} lies inside the output folder {out_dir}, which prepare replaces;"
                " move it or pick another --name"
            )


def prepare(
    dataset="python_stdlib",
    inputs=None,
    tokenizer=None,
    data_root="data",
    name=None,
    val_fraction=None,
    shard_tokens=100_000_000,
    val_tokens=None,
    max_docs=None,
    block_size=None,
) -> Path:
    """Tokenize a dataset into shards plus meta.json under <data_root>/<name>/ and return that folder.

    val_fraction (default 0.1) splits the file datasets; val_tokens (default 100M) and max_docs are for the
    web datasets; block_size (default 1024) is for sft."""
    started = time.perf_counter()
    _check_options(dataset, val_fraction, shard_tokens, val_tokens, max_docs, block_size)
    tokenizer_name = tokenizer or DEFAULT_TOKENIZER[dataset]
    out_dir = Path(data_root) / (name or dataset)
    if dataset == "sft":
        val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        meta = _prepare_sft(out_dir, inputs, tokenizer_name, val_fraction, block_size or DEFAULT_SFT_BLOCK_SIZE)
    elif dataset in WEB_DATASETS:
        val_tokens = DEFAULT_VAL_TOKENS if val_tokens is None else val_tokens
        meta = _prepare_stream(out_dir, dataset, inputs, tokenizer_name, shard_tokens, val_tokens, max_docs, started)
    else:
        val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        meta = _prepare_files(out_dir, dataset, inputs, tokenizer_name, data_root, val_fraction, shard_tokens, started)
    seconds = time.perf_counter() - started
    print(
        f"{out_dir}: {meta['tokens']['train']:,} train + {meta['tokens']['val']:,} val tokens"
        f" in {seconds:.1f}s ({meta['source_bytes'] / 1e6 / seconds:.1f} MB/s)"
    )
    return out_dir


def _prepare_files(out_dir, dataset, inputs, tokenizer_name, data_root, val_fraction, shard_tokens, started) -> dict:
    documents = _source_documents(dataset, inputs, data_root)
    _check_inputs_survive(documents, out_dir)
    source_bytes, splits = _plan_splits(documents, val_fraction)
    tok = _build_tokenizer(tokenizer_name, documents)
    print(
        f"{dataset}: {source_bytes:,} bytes in {len(documents):,} file(s),"
        f" tokenizer {tokenizer_name} (vocab {tok.vocab_size:,})"
    )
    with _new_folder(out_dir) as folder:
        tokens, source_sha256 = _write_splits(folder, splits, tok, shard_tokens, started)
        meta = _meta(dataset, tokenizer_name, tok, tokens=tokens, source_bytes=source_bytes,
                     source_sha256=source_sha256, val_fraction=val_fraction)
        _write_meta(folder, meta)
    return meta


def _prepare_stream(out_dir, dataset, inputs, tokenizer_name, shard_tokens, val_tokens, max_docs, started) -> dict:
    files = _input_files(inputs) if inputs else {}
    files = sorted(files, key=lambda path: (files[path], path))  # by path relative to the input root
    _check_inputs_survive(files, out_dir)
    documents = _local_documents(files) if inputs else _hub_documents(dataset)
    tok = _tokenizer_without_source(tokenizer_name)
    source = f"{len(files):,} file(s)" if inputs else f"the Hugging Face hub ({WEB_DATASETS[dataset][0]})"
    print(f"{dataset}: documents from {source}, tokenizer {tokenizer_name} (vocab {tok.vocab_size:,})")
    with _new_folder(out_dir) as folder:
        counts = _write_stream(folder, itertools.islice(documents, max_docs), tok, shard_tokens, val_tokens, started)
        meta = _meta(dataset, tokenizer_name, tok, **counts, val_tokens=val_tokens)
        _write_meta(folder, meta)
    return meta


def _meta(dataset: str, tokenizer_name: str, tokenizer: Tokenizer, **fields) -> dict:
    """meta.json's content: what the shards hold and how to decode them."""
    return {"dataset": dataset, "tokenizer": tokenizer_name, **tokenizer_meta(tokenizer), **fields,
            "shard_format": "llm.c v1 uint16"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tokenize text into llm.c-format token shards in <data_root>/<name>/.")
    defaults = {name: parameter.default for name, parameter in inspect.signature(prepare).parameters.items()}
    parser.add_argument(
        "dataset",
        nargs="?",
        default=defaults["dataset"],
        help="python_stdlib: Python's own standard library sources, no download; shakespeare_char: tiny"
        " shakespeare, downloaded once unless --input is given; text: your files via --input;"
        f" {', '.join(WEB_DATASETS)}: web text streamed from the Hugging Face hub (pip install datasets) unless"
        " --input is given; sft: fine-tuning records (JSON Lines of prompt/completion or messages) with a loss"
        " mask; meta: write meta.json for llm.c-format shards already in <data_root>/<name>/"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        metavar="PATH",
        help="files, folders (every non-hidden file, recursively) or glob patterns to read; for web datasets"
        " .jsonl (a text field per line), .parquet (a text column) or other files (one document each)"
        " (default: the dataset's own)",
    )
    parser.add_argument(
        "--tokenizer",
        help="byte, char, gpt2 or any tiktoken encoding name (default: char for shakespeare_char, gpt2 for web"
        " datasets, sft and meta, else byte)",
    )
    parser.add_argument("--data_root", default=defaults["data_root"], help="folder of prepared datasets (default: %(default)s)")
    parser.add_argument("--name", help="output folder name under --data_root (default: the dataset name)")
    parser.add_argument(
        "--val_fraction",
        type=float,
        help="fraction of source bytes, taken from the end, that becomes the val split (sft: of records, spread"
        f" evenly); not for web datasets (default: {DEFAULT_VAL_FRACTION})",
    )
    parser.add_argument(
        "--val_tokens",
        type=int,
        help=f"web datasets: the stream's first this many tokens become the val split (default: {DEFAULT_VAL_TOKENS})",
    )
    parser.add_argument("--max_docs", type=int, help="web datasets: stop after this many documents (default: all)")
    parser.add_argument(
        "--block_size",
        type=int,
        help="sft: drop records longer than this + 1 tokens, train.py's row length at this block_size"
        f" (default: {DEFAULT_SFT_BLOCK_SIZE})",
    )
    parser.add_argument(
        "--shard_tokens", type=int, default=defaults["shard_tokens"], help="tokens per shard file (default: %(default)s)"
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
