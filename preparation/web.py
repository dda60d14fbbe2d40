"""Web datasets (fineweb10B, fineweb_edu10B, openwebtext): a stream of documents from the Hugging
Face hub or local files, end-of-text before each, the first val_tokens tokens held out as val
(llm.c's convention), their last test_tokens as test when asked for."""

import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np

from data import DataError, Tokenizer, write_meta
from preparation.common import (
    BATCH_BYTES,
    LeakageAudit,
    ShardWriter,
    check_inputs_survive,
    dataset_meta,
    document_hash,
    input_files,
    new_folder,
    tokenizer_without_source,
)

WEB_DATASETS = {  # name: (hub repository, config), streamed unless --input names local files
    "fineweb10B": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb_edu10B": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "openwebtext": ("Skylion007/openwebtext", None),
}


DEFAULT_VAL_TOKENS = 100_000_000  # llm.c's convention: a web stream's first 100M tokens are val


def _hub_documents(dataset: str):
    """The dataset's texts, streamed from the Hugging Face hub in the hub's order."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"streaming {dataset} needs `pip install datasets`, or pass --input with "
                        "local files") from None
    return _hub_texts(datasets, *WEB_DATASETS[dataset])


def _hub_texts(datasets, repository: str, config):
    try:
        for record in datasets.load_dataset(repository, config, split="train", streaming=True):
            yield record["text"]
    except Exception as e:  # the hub client raises all sorts (OSError, httpx, RuntimeError, ...)
        raise DataError(
            f"could not stream {repository} from the Hugging Face hub ({e}); download its files"
            " and pass --input"
        ) from e


def _local_documents(files: list[Path]):
    """The texts in the files, in order, each checked to be a string."""
    for path in files:
        try:
            for text in _file_texts(path):
                if not isinstance(text, str):
                    raise DataError(f"{path} has a text of type {type(text).__name__}, not str; "
                                    "fix or drop it")
                yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 ({e.reason}); convert it or leave it out of "
                            "--input") from None


def _file_texts(path: Path):
    """A .jsonl's "text" fields, a .parquet's "text" column, else the whole file as one text."""
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
                    raise DataError(f"line {number} of {path} is not a JSON object with a text "
                                    "field; fix it") from None


def _parquet_texts(path: Path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"reading {path} needs `pip install pyarrow`, or convert it to "
                        ".jsonl") from None
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as e:
        raise DataError(f"{path} is not a readable parquet file ({e}); fix it or leave it out of "
                        "--input") from None
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no text column, only "
                        f"{', '.join(parquet.schema_arrow.names)}; pass files with one")
    for batch in parquet.iter_batches(columns=["text"]):
        yield from batch.column("text").to_pylist()


def _document_batches(documents):
    """Documents in lists of about BATCH_BYTES characters: every core kept busy, little memory."""
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
    """(UTF-8 text, tokens led by end-of-text as in llm.c) per document, tokenized a batch at a time
    on all cores."""
    eot = np.array([tokenizer.eot_id], dtype=tokenizer.dtype)
    for batch in _document_batches(documents):
        encoded = [text.encode() for text in batch]
        chunks = batch if tokenizer.reads_text else encoded
        for data, tokens in zip(encoded, tokenizer.encode_chunks(chunks)):
            yield data, np.concatenate([eot, tokens])


def _write_stream(folder: Path, documents, tokenizer: Tokenizer, shard_tokens: int, val_tokens: int,
                  test_tokens: int, started) -> dict:
    """Shards of the stream's first val_tokens tokens (the held-out part: val, then its last
    test_tokens as test), then train shards; returns meta's counts. A document crossing a split's
    end is cut there and the rest of it dropped, the dropped tokens still counting towards the
    held-out part, so train is the same with or without test.
    """
    progress = _Progress()
    ends = ({"val": val_tokens - test_tokens, "test": val_tokens} if test_tokens
            else {"val": val_tokens})
    splits = ["train", *ends]
    writers = {split: ShardWriter(folder, split, shard_tokens, tokenizer.dtype, started,
                                  progress.log) for split in splits}
    documents_per_split = dict.fromkeys(splits, 0)
    audit = LeakageAudit("document", splits)
    source_hash, source_bytes, held_out = hashlib.sha256(), 0, 0  # held_out: tokens before train
    for data, tokens in _document_tokens(documents, tokenizer):
        source_hash.update(data)
        source_bytes += len(data)
        split = next((split for split, end in ends.items() if held_out < end), "train")
        if split == "train":
            writers[split].add(tokens)
        else:
            # the rest of a crossing document is dropped
            writers[split].add(tokens[: ends[split] - held_out])
            held_out += len(tokens)
            if held_out >= ends[split]:
                writers[split].flush()  # the split is whole: write it now, not after all of train
        documents_per_split[split] += 1
        if data:
            audit.add(split, document_hash(data))
        progress.update(documents_per_split, writers)
    if not documents_per_split["train"]:
        raise DataError(
            f"the documents give {held_out:,} tokens, none left for train after --val_tokens"
            f" {val_tokens:,}; use more documents or a smaller --val_tokens"
        )
    if test_tokens and not documents_per_split["test"]:
        raise DataError(
            f"the val document crossing into test (at token {ends['val']:,}) runs past"
            f" --val_tokens {val_tokens:,}, leaving test empty; raise --test_tokens well above a"
            " document's length"
        )
    for writer in writers.values():
        writer.flush()
    progress.update(documents_per_split, writers, done=True)
    return {"tokens": {split: writer.tokens for split, writer in writers.items()},
            "documents": documents_per_split, "source_bytes": source_bytes,
            "source_sha256": source_hash.hexdigest(), "leakage": audit.report()}


class _Progress:
    """A status line redrawn in place about once a second; log prints a message over it."""

    def __init__(self):
        self.started = self.shown = time.perf_counter()
        self.width = 0  # of the status line on screen, which the next print must cover

    def update(self, documents: dict, writers: dict, done=False) -> None:
        now = time.perf_counter()
        if done or now - self.shown >= 1:
            self.shown, seconds = now, max(now - self.started, 1e-9)
            docs = sum(documents.values())
            tokens = sum(writer.tokens for writer in writers.values())
            shards = sum(writer.shards for writer in writers.values())
            rates = (f"{docs:,} docs ({docs / seconds:,.0f}/s), "
                     f"{tokens:,} tokens ({tokens / seconds:,.0f}/s)")
            self.log(f"{rates}, {shards} shards written", end="\n" if done else "")

    def log(self, message: str, end="\n") -> None:
        print("\r" + message.ljust(self.width), end=end, flush=True)
        self.width = 0 if end else len(message)


def prepare_stream(out_dir, dataset, inputs, tokenizer_name, shard_tokens, val_tokens, test_tokens,
                   max_docs, started) -> dict:
    files = input_files(inputs) if inputs else {}
    files = sorted(files, key=lambda path: (files[path], path))  # by path under the input root
    check_inputs_survive(files, out_dir)
    documents = _local_documents(files) if inputs else _hub_documents(dataset)
    tok = tokenizer_without_source(tokenizer_name)
    if tok.eot_id is None:
        raise DataError(f"tokenizer {tokenizer_name} has no end-of-text token to put before each "
                        "document; use gpt2 or byte")
    source = (f"{len(files):,} file(s)" if inputs
              else f"the Hugging Face hub ({WEB_DATASETS[dataset][0]})")
    print(f"{dataset}: documents from {source}, tokenizer {tokenizer_name} "
          f"(vocab {tok.vocab_size:,})")
    with new_folder(out_dir) as folder:
        documents = itertools.islice(documents, max_docs)
        counts = _write_stream(folder, documents, tok, shard_tokens, val_tokens, test_tokens,
                               started)
        test = {"test_tokens": test_tokens} if test_tokens else {}
        meta = dataset_meta(dataset, tokenizer_name, tok, **counts, val_tokens=val_tokens, **test)
        write_meta(folder, meta)
    return meta
