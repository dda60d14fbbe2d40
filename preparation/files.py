"""File datasets (python_stdlib, shakespeare_char, text): documents in a fixed pseudo-random order,
split by bytes into train, val and optionally test (the rule is in prepare.py's docstring),
tokenized a batch of chunks at a time."""

import hashlib
import http.client
import os
import shutil
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np

from data import DataError, Tokenizer, get_tokenizer, write_meta
from preparation.bpe import train_bpe
from preparation.common import (
    BATCH_BYTES,
    CHUNK_BYTES,
    DOWNLOAD_CACHE,
    LeakageAudit,
    ShardWriter,
    check_inputs_survive,
    dataset_meta,
    document_hash,
    files_under,
    input_files,
    new_folder,
)

STDLIB_SKIPPED_FOLDERS = {"site-packages", "test", "tests", "idle_test"}
# name: (what it is, URL of one text file fetched once into <data_root>/<name>/, default tokenizer)
DOWNLOADED = {
    "shakespeare_char": ("tiny shakespeare, 1 MB",
                         "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                         "tinyshakespeare/input.txt", "char"),
}


def _source_documents(dataset: str, inputs, data_root) -> list[Path]:
    """The dataset's files in split order: by sha256 of the path relative to their input root."""
    if dataset == "python_stdlib":
        if inputs:
            raise DataError("python_stdlib reads Python's own standard library, so drop --input or "
                            "use `text`")
        files = stdlib_files()
    elif inputs:
        files = input_files(inputs)
    elif dataset in DOWNLOADED:
        files = {_downloaded_file(dataset, data_root).resolve(): DOWNLOAD_CACHE}
    else:
        raise DataError("the text dataset needs input: pass --input with files, folders or glob "
                        "patterns")
    return sorted(files, key=lambda path: (hashlib.sha256(files[path].encode()).hexdigest(), path))


def stdlib_files() -> dict[Path, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return files_under(root, lambda folder: folder not in STDLIB_SKIPPED_FOLDERS,
                       lambda name: name.endswith(".py"))


def _downloaded_file(dataset: str, data_root) -> Path:
    """The dataset's source file, downloaded on first use and kept in its folder for later runs."""
    path = Path(data_root) / dataset / DOWNLOAD_CACHE
    if not path.is_file():
        _download(dataset, DOWNLOADED[dataset][1], path)
    return path


def _download(dataset: str, url: str, path: Path) -> None:
    print(f"downloading {url} to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {dataset} ({e}); "
                        "pass --input PATH to a local copy") from None


def _plan_splits(documents: list[Path], val_fraction: float,
                 test_fraction: float) -> tuple[int, dict[str, list]]:
    """Source size and, per split, its (path, start, end, ends_document) byte segments. Test, when
    asked for, is the last test_fraction of the bytes, carved out of the val_fraction held out, so
    train is the same either way."""
    sizes = [path.stat().st_size for path in documents]
    total = sum(sizes)
    if total == 0:
        raise DataError("the input text is empty (0 bytes); pass files that contain text")
    fractions = ({"val": val_fraction, "test": test_fraction} if test_fraction
                 else {"val": val_fraction})
    cuts = [0, *(_character_start(documents, sizes, int(total * (1 - f)))
                 for f in fractions.values()), total]
    if any(low >= high for low, high in zip(cuts, cuts[1:])):
        options = " and ".join(f"--{split}_fraction {fraction}"
                               for split, fraction in fractions.items())
        wanted = "train, val and test" if test_fraction else "both train and val"
        raise DataError(
            f"the source ({total:,} bytes) is too small to give {wanted} text at {options}; "
            "use more text or other fractions"
        )
    splits = ["train", *fractions]
    return total, {split: _segments(documents, sizes, cuts[i], cuts[i + 1])
                   for i, split in enumerate(splits)}


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
    """The parts of the documents inside source bytes [low, high), with whether each ends there."""
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
                raise DataError(f"{path} got shorter while being read; rerun prepare once "
                                "nothing writes to it")
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
        raise DataError(f"{path} is not UTF-8 ({e.reason}); leave it out of --input or use "
                        "--tokenizer byte") from None


def source_chars(documents: list[Path]) -> str:
    """The char tokenizer's vocabulary: every distinct character of the source (one extra read)."""
    chars = set()
    for text in _texts([(path, 0, path.stat().st_size, None) for path in documents]):
        chars.update(text)
    return "".join(sorted(chars))


def _texts(segments: list[tuple]):
    """The text of a split's segments, a chunk at a time."""
    for path, start, end, _ in segments:
        for chunk in _read_chunks(path, start, end):
            yield _as_text(chunk, path)


def _tokenizer(name: str, vocab_size, documents: list[Path], splits: dict) -> Tokenizer:
    """char takes its vocabulary from the whole source; bpe learns its own from the train split
    alone; the others need nothing from the source."""
    if name == "bpe":
        return train_bpe(_texts(splits["train"]), vocab_size)
    return get_tokenizer({"tokenizer": name,
                          "chars": source_chars(documents) if name == "char" else None})


def _split_tokens(segments: list[tuple], tokenizer: Tokenizer, source_hash):
    """Token arrays of one split in source order, end-of-text after each document ending in it."""
    eot = None if tokenizer.eot_id is None else np.array([tokenizer.eot_id], dtype=tokenizer.dtype)
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
    encoded = iter(tokenizer.encode_chunks([item for item in batch
                                            if not isinstance(item, np.ndarray)]))
    for item in batch:
        yield item if isinstance(item, np.ndarray) else next(encoded)


def _write_splits(folder: Path, splits: dict, tokenizer: Tokenizer, shard_tokens: int,
                  started: float):
    """Shards for every split; returns the token counts and the sha256 of the source it read."""
    source_hash = hashlib.sha256()
    tokens = {}
    for split, segments in splits.items():
        writer = ShardWriter(folder, split, shard_tokens, tokenizer.dtype, started)
        for array in _split_tokens(segments, tokenizer, source_hash):
            writer.add(array)
        writer.flush()
        tokens[split] = writer.tokens
    return tokens, source_hash.hexdigest()


def _leakage(splits: dict, several_files: bool) -> dict:
    """The leakage audit. With several files a document is a file (its part in the split, exact
    bytes); a single file, which straddles the cut anyway, is audited by paragraph: a block of
    non-blank lines, without the whitespace around it (one speech in tiny shakespeare)."""
    audit = LeakageAudit("file" if several_files else "paragraph", splits)
    for split, segments in splits.items():
        for path, start, end, _ in segments:
            if several_files:
                digest = document_hash()
                for chunk in _read_chunks(path, start, end):
                    digest.update(chunk)
                audit.add(split, digest)
            else:
                for digest in _paragraph_hashes(path, start, end):
                    audit.add(split, digest)
    return audit.report()


def _paragraph_hashes(path: Path, start: int, end: int):
    """document_hash of each paragraph in path's bytes [start, end), fed a line at a time so that
    memory stays flat; a line is held back until the next one shows whether it ends its paragraph
    (and loses trailing space)."""
    with open(path, "rb") as f:
        f.seek(start)
        left, digest, held = end - start, None, b""
        while left:
            line = f.readline(min(left, CHUNK_BYTES))
            if not line:
                raise DataError(f"{path} got shorter while being read; rerun prepare once "
                                "nothing writes to it")
            left -= len(line)
            if not line.isspace():
                if digest is None:
                    digest, line = document_hash(), line.lstrip()
                else:
                    digest.update(held)
                held = line
            elif digest is not None:
                digest.update(held.rstrip())
                yield digest
                digest = None
        if digest is not None:
            digest.update(held.rstrip())
            yield digest


def prepare_files(out_dir, dataset, inputs, tokenizer_name, vocab_size, data_root, val_fraction,
                  test_fraction, shard_tokens, started) -> dict:
    documents = _source_documents(dataset, inputs, data_root)
    check_inputs_survive(documents, out_dir)
    source_bytes, splits = _plan_splits(documents, val_fraction, test_fraction)
    tok = _tokenizer(tokenizer_name, vocab_size, documents, splits)
    print(
        f"{dataset}: {source_bytes:,} bytes in {len(documents):,} file(s),"
        f" tokenizer {tokenizer_name} (vocab {tok.vocab_size:,})"
    )
    with new_folder(out_dir) as folder:
        tokens, source_sha256 = _write_splits(folder, splits, tok, shard_tokens, started)
        test = {"test_fraction": test_fraction} if test_fraction else {}
        meta = dataset_meta(dataset, tokenizer_name, tok, tokens=tokens, source_bytes=source_bytes,
                            source_sha256=source_sha256, val_fraction=val_fraction, **test,
                            leakage=_leakage(splits, len(documents) > 1))
        write_meta(folder, meta)
    return meta
