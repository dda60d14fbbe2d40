"""Web datasets (fineweb10B, fineweb_edu10B, openwebtext): a stream of documents from the Hugging Face hub or
local files, end-of-text before each, the first val_tokens tokens as val (llm.c's convention)."""

import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np

from data import DataError, Tokenizer
from preparation.common import (
    BATCH_BYTES,
    ShardWriter,
    check_inputs_survive,
    dataset_meta,
    input_files,
    new_folder,
    tokenizer_without_source,
    write_meta,
)

WEB_DATASETS = {  # name: (Hugging Face hub repository, config), streamed unless --input names local files
    "fineweb10B": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb_edu10B": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "openwebtext": ("Skylion007/openwebtext", None),
}


DEFAULT_VAL_TOKENS = 100_000_000  # llm.c's convention for web data: the stream's first 100M tokens are val


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
    writers = {split: ShardWriter(folder, split, shard_tokens, started, progress.log) for split in ("train", "val")}
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


def prepare_stream(out_dir, dataset, inputs, tokenizer_name, shard_tokens, val_tokens, max_docs, started) -> dict:
    files = input_files(inputs) if inputs else {}
    files = sorted(files, key=lambda path: (files[path], path))  # by path relative to the input root
    check_inputs_survive(files, out_dir)
    documents = _local_documents(files) if inputs else _hub_documents(dataset)
    tok = tokenizer_without_source(tokenizer_name)
    source = f"{len(files):,} file(s)" if inputs else f"the Hugging Face hub ({WEB_DATASETS[dataset][0]})"
    print(f"{dataset}: documents from {source}, tokenizer {tokenizer_name} (vocab {tok.vocab_size:,})")
    with new_folder(out_dir) as folder:
        counts = _write_stream(folder, itertools.islice(documents, max_docs), tok, shard_tokens, val_tokens, started)
        meta = dataset_meta(dataset, tokenizer_name, tok, **counts, val_tokens=val_tokens)
        write_meta(folder, meta)
    return meta
