"""What the three pipelines share: finding input files, building the tokenizer, writing shards into
a fresh folder that replaces the old one only when complete, and meta.json's content
(data.write_meta writes it)."""

import contextlib
import glob
import hashlib
import os
import shutil
import socket
import time
from array import array
from pathlib import Path

import numpy as np

from data import (
    DataError,
    Tokenizer,
    get_tokenizer,
    shard_format,
    tokenizer_meta,
    write_shard,
)

CHUNK_BYTES = 2 << 20  # read size; small enough that memory stays flat on any input size


BATCH_BYTES = CHUNK_BYTES * (os.cpu_count() or 1)  # enough chunks to keep every core busy


DOWNLOAD_CACHE = "input.txt"  # a downloaded source kept inside its dataset folder


def input_files(inputs) -> dict[Path, str]:
    """Files named by --input, each keyed by its path under its input root; duplicates merge."""
    files = {}
    for spec in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        for path in _expand(str(spec)):
            if path.is_dir():
                found = files_under(path, _is_visible, _is_visible)
                if not found:
                    raise DataError(f"folder {path} holds no files (hidden ones are skipped); "
                                    "pass one with text")
            elif path.is_file():
                found = {path: path.name}
            else:
                raise DataError(f"input {path} is not a regular file or folder; pass files, "
                                "folders or glob patterns")
            files.update({found_path.resolve(): key for found_path, key in found.items()})
    return files


def _expand(spec: str) -> list[Path]:
    if Path(spec).exists():
        return [Path(spec)]
    if not any(wildcard in spec for wildcard in "*?["):
        raise DataError(f"input path {spec} does not exist; pass an existing file, folder or "
                        "glob pattern")
    matches = sorted(glob.glob(spec, recursive=True))
    if not matches:
        raise DataError(f"input pattern {spec!r} matched nothing; check it, and quote it to keep "
                        "it from the shell")
    return [Path(match) for match in matches]


def _is_visible(name: str) -> bool:
    return not name.startswith(".")


def files_under(root: Path, keep_folder, keep_file) -> dict[Path, str]:
    """Regular files below root, keyed by relative path; pruned folders are never walked."""
    files = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if keep_folder(name)]
        for name in names:
            path = Path(folder, name)
            if keep_file(name) and path.is_file():
                files[path] = path.relative_to(root).as_posix()
    return files


def check_inputs_survive(documents: list[Path], out_dir: Path) -> None:
    """Inputs inside the folder being replaced would be deleted with it (only the download cache
    is kept)."""
    out_dir = out_dir.resolve()
    for path in documents:
        if path.is_relative_to(out_dir) and path != out_dir / DOWNLOAD_CACHE:
            raise DataError(
                f"input {path} lies inside the output folder {out_dir}, which prepare replaces;"
                " move it or pick another --name"
            )


def tokenizer_without_source(name: str) -> Tokenizer:
    """A tokenizer that needs nothing from the source up front: any but char and bpe."""
    if name == "char":
        raise DataError("the char tokenizer takes its vocabulary from a whole source, not a "
                        "stream; use gpt2 or byte")
    if name == "bpe":
        raise DataError("the bpe tokenizer learns its vocabulary from the train split before "
                        "tokenizing, but web data is split by token counts and `meta` shards are "
                        "tokenized already; use gpt2 or byte")
    return get_tokenizer({"tokenizer": name})


class ShardWriter:
    """Packs token arrays into a preallocated buffer of the tokenizer's dtype and writes it out as a
    shard whenever it fills."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype, started: float,
                 log=print):
        self.folder, self.split, self.started, self.log = folder, split, started, log
        self.buffer = np.empty(shard_tokens, dtype=dtype)
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
        seconds = time.perf_counter() - self.started
        self.log(f"  {path.name}: {self.filled:,} tokens ({seconds:.1f}s)")
        self.shards += 1
        self.filled = 0


def alive(pid):
    """Whether process `pid` exists (PermissionError: it does, under another user)."""
    try:
        os.kill(pid, 0)  # signal 0 only checks
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def temporary_folder(out_dir: Path, pid):
    """out_dir's sibling that process `pid` of this machine fills: named for both, so that a stale
    one is known (and other machines' preparations into a shared folder are left alone)."""
    return out_dir.with_name(f"{out_dir.name}.tmp-{socket.gethostname()}-{pid}")


def remove_stale_folders(out_dir: Path):
    """Remove the temporary folders beside out_dir that killed preparations on this machine left
    (their process is gone), saying so: for web data they hold gigabytes."""
    for stale in sorted(out_dir.parent.glob(glob.escape(temporary_folder(out_dir, "").name) + "*")):
        pid = stale.name.rpartition("-")[2]
        if stale.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
            print(f"removed {stale}: a preparation that was stopped left it "
                  f"(process {pid} is gone)")


@contextlib.contextmanager
def new_folder(out_dir: Path):
    """A temporary sibling to fill, swapped in for out_dir if the block succeeds, else deleted."""
    remove_stale_folders(out_dir)
    tmp_dir = temporary_folder(out_dir, os.getpid())
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


def document_hash(data: bytes = b""):
    """The audit's hash of a document: 64-bit blake2b, fed its bytes now or with update()."""
    return hashlib.blake2b(data, digest_size=8)


class LeakageAudit:
    """Counts the held-out (val, test) documents that also occur verbatim in train: exact equality
    of their document_hash, so near-duplicates are not caught; with 64-bit hashes a false match is
    negligibly rare (about n_train * n_held / 2**64). A hash is kept as 8 bytes, so a 15M-document
    stream needs 120 MB."""

    def __init__(self, unit: str, splits):
        self.unit = unit  # what one document is, for meta.json and the report
        self.hashes = {split: array("Q") for split in splits}

    def add(self, split: str, digest) -> None:
        self.hashes[split].append(int.from_bytes(digest.digest(), "little"))

    def report(self) -> dict:
        """meta.json's "leakage": the unit, then per held-out split its documents and how many are
        in train."""
        train = np.frombuffer(self.hashes["train"], dtype=np.uint64)
        report = {"unit": self.unit}
        for split in [split for split in self.hashes if split != "train"]:
            held = np.frombuffer(self.hashes[split], dtype=np.uint64)
            report[f"{split}_docs"] = len(held)
            report[f"{split}_in_train"] = int(np.isin(held, train).sum())
        return report


def dataset_meta(dataset: str, tokenizer_name: str, tokenizer: Tokenizer, **fields) -> dict:
    """meta.json's content: what the shards hold and how to decode them."""
    return {"dataset": dataset, "tokenizer": tokenizer_name, **tokenizer_meta(tokenizer), **fields,
            "shard_format": shard_format(tokenizer.dtype)}
