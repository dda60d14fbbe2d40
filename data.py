"""The read side of the data: the shard format, meta.json, tokenizers, and the batch samplers that
train.py draws from. `prepare.py` writes what this module reads; training, sampling, export and the
benchmarks import this module alone, never the preparation pipeline.

Shard format (llm.c / modded-nanogpt, so their published FineWeb shards load unchanged): a header of
256 little-endian int32 -- magic, version, token count, then zeros -- followed by the tokens: magic
20240520, version 1 for uint16 tokens (llm.c's GPT-2 shards), magic 20240801, version 7 for uint32
ones (its Llama 3 shards; needed above 65,536 ids). A split is every `*{split}_NNNNNN.bin` of a
dataset folder, in name order: train, val, and test when prepare made one (has_split tells; it opens
like val). Fine-tuning data (`prepare.py sft`) is instead `{split}_tokens.npy` (uint16 or uint32, as
shards), `{split}_mask.npy` and `{split}_offsets.npy`. meta.json's "leakage" is prepare's count of
held-out documents also found verbatim in train (leaked_documents reads it). A trained (bpe)
tokenizer lies beside meta.json as tokenizer.json, Hugging Face's format, which meta.json names with
its sha256; read_meta puts its text in the meta it returns (as "tokenizer_json"), so a checkpoint,
which stores that meta, carries its tokenizer.
"""

import errno
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import tokenizers

# a shard's (magic, version) per token dtype: llm.c's for GPT-2 (uint16) and Llama 3 (uint32) tokens
SHARD_HEADERS = {np.dtype("<u2"): (20240520, 1), np.dtype("<u4"): (20240801, 7)}
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as int32
EOT_TEXT = "<|endoftext|>"  # a tiktoken encoding's end-of-text token, where it has one
SPECIAL_TOKENS = (EOT_TEXT,)  # a trained (bpe) tokenizer's, ids 0...; SFT_TEMPLATE needs no other
TOKENIZER_FILE = "tokenizer.json"  # a trained tokenizer's, beside meta.json (transformers reads it)
TIKTOKEN_ALIASES = {"gpt2": "r50k_base"}  # same ranks; r50k's one cached file serves gpt2 offline
SFT_TEMPLATE = "sft v1"  # the sft rendering, in prepare.py's docstring; sample.py --chat follows it
SFT_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}  # turn headers
# the datasets of `python prepare.py <name>`
NAMED_DATASETS = ("shakespeare_char", "fineweb10B", "fineweb_edu10B", "openwebtext")


class DataError(Exception):
    """Bad input or data; the message is one sentence naming the problem and the fix."""


# ---- shard files -------------------------------------------------------------------------------


def shard_format(dtype: np.dtype) -> str:
    """meta.json's name for shards of this dtype."""
    return f"llm.c v{SHARD_HEADERS[dtype][1]} {dtype.name}"


def write_shard(path, tokens) -> None:
    """Write tokens as an llm.c shard, atomically, so a reader never sees a half-written file: as
    uint32 when given a uint32 array (a vocabulary over 65,536 ids), else as uint16."""
    tokens = _as_shard_dtype(tokens)
    if len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS:,} tokens, got {len(tokens):,}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = *SHARD_HEADERS[tokens.dtype], len(tokens)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hidden, so shard globs skip it
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(memoryview(tokens))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _as_shard_dtype(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.dtype == np.uint32:
        return np.ascontiguousarray(tokens, dtype="<u4")
    if (tokens.dtype != np.uint16 and tokens.size
            and (tokens.min() < 0 or tokens.max() >= 2**16)):
        raise ValueError("token ids must fit uint16 (0..65535);"
                         " pass a uint32 array for larger ones")
    return np.ascontiguousarray(tokens, dtype="<u2")


def open_shard(path):
    """(the shard's file, open for reading, its token count and their dtype), after checking its
    header against its size. Memory-mapping the open file (not the path) reads the data it held when
    opened, even after prepare.py has swapped a new folder in under the same name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} does not exist; run prepare.py to create it")
    try:
        file = open(path, "rb")  # closed here on error, else by its owner (Windows.close)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        raise DataError(f"cannot open {path}: this process may open no more files (a sampler holds "
                        "each shard open); raise the limit (ulimit -n) or prepare fewer, larger "
                        "shards (--shard_tokens)") from None
    try:
        size = os.fstat(file.fileno()).st_size
        if size < HEADER_BYTES:
            raise DataError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte "
                            "header; re-create it")
        magic, version, count = (int(x) for x in np.frombuffer(file.read(12), dtype="<i4"))
        versions = dict(SHARD_HEADERS.values())  # magic: version
        if magic not in versions:
            magics = " or ".join(f"{known} ({dtype.name} tokens)"
                                 for dtype, (known, _) in SHARD_HEADERS.items())
            raise DataError(f"{path} has magic {magic}, not {magics}, so it is not a token shard; "
                            "re-create it")
        if version != versions[magic]:
            raise DataError(f"shard {path} is version {version}, but only {versions[magic]} is "
                            "supported; re-create it")
        dtype = next(dtype for dtype, header in SHARD_HEADERS.items()
                     if header == (magic, version))
        expected = HEADER_BYTES + dtype.itemsize * count
        if count < 0 or size != expected:
            raise DataError(
                f"shard {path} is {size:,} bytes but its header promises {count:,} tokens"
                f" ({expected:,} bytes), so it is truncated or corrupt; re-create it"
            )
    except BaseException:
        file.close()
        raise
    return file, count, dtype


def allow_open_files(count):
    """Raise this process's soft limit on open files towards the hard one where `count` more could
    exceed it (a large corpus is a thousand shards; the usual soft limit is 1024)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def map_tokens(file, count, dtype) -> np.memmap:
    """An open shard's tokens, memory-mapped read-only."""
    return np.memmap(file, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def load_shard(path) -> np.memmap:
    """Memory-map a shard's tokens read-only, after checking its header against the file size."""
    file, count, dtype = open_shard(path)
    with file:  # the map keeps its own handle
        return map_tokens(file, count, dtype)


def shard_paths(data_dir, split: str) -> list[Path]:
    """A split's shards in order; the glob also finds llm.c names like fineweb_train_000001.bin."""
    paths = sorted(Path(data_dir).glob(f"*{split}_[0-9]*.bin"))
    if not paths:
        option = " with --test_fraction (web data: --test_tokens)" if split == "test" else ""
        raise DataError(f"no {split} shards in {data_dir};"
                        f" run `{prepare_command(data_dir)}`{option} first")
    return paths


def has_split(data_dir, split: str) -> bool:
    """Whether a dataset holds this split (shards or sft arrays): test only if prepared with one."""
    data_dir = Path(data_dir)
    return ((data_dir / f"{split}_tokens.npy").is_file()
            or any(data_dir.glob(f"*{split}_[0-9]*.bin")))


def read_meta(data_dir) -> dict:
    """The meta.json that prepare wrote next to the shards."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file() and any(Path(data_dir).glob("*.bin")):
        raise DataError(
            f"{data_dir} holds shards but no meta.json; for shards from llm.c or modded-nanogpt run"
            f" `{prepare_command(data_dir, f' meta --name {shlex.quote(Path(data_dir).name)}')}`"
            f", else re-create them with `{prepare_command(data_dir)}`"
        )
    if not meta_path.is_file():
        raise DataError(f"no prepared data in {data_dir} (no meta.json);"
                        f" run `{prepare_command(data_dir)}` first")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:  # not JSON, or not even text
        raise DataError(f"{meta_path} is not JSON ({e});"
                        f" re-create it with `{prepare_command(data_dir)}`") from None
    if not well_formed(meta):
        raise DataError(f"{meta_path} is not a dataset's meta (an object with its tokenizer, "
                        "vocab_size and, for char tokens, chars; for bpe tokens, tokenizer_file "
                        f"and tokenizer_sha256); re-create it with `{prepare_command(data_dir)}`")
    if meta["tokenizer"] == "bpe":
        meta["tokenizer_json"] = _tokenizer_json(Path(data_dir), meta)
    return meta


def well_formed(meta) -> bool:
    """Whether a meta holds what reading its data needs: an object naming its tokenizer, a positive
    vocab_size, a char tokenizer's chars, and a bpe tokenizer's file and sha256."""
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), str):
        return False
    vocab = meta.get("vocab_size")
    chars_ok = meta["tokenizer"] != "char" or isinstance(meta.get("chars"), str)
    file_ok = meta["tokenizer"] != "bpe" or all(isinstance(meta.get(key), str)
                                                for key in ("tokenizer_file", "tokenizer_sha256"))
    return type(vocab) is int and vocab > 0 and chars_ok and file_ok


def _tokenizer_json(data_dir: Path, meta: dict) -> str:
    """A trained tokenizer's JSON text, from the file meta.json names, checked against the sha256 it
    gives: the token ids of the data mean what that very file says."""
    path = data_dir / meta["tokenizer_file"]
    try:
        content = path.read_bytes()
    except OSError as e:
        raise DataError(f"the tokenizer {path} that meta.json names cannot be read ({e.strerror}); "
                        f"re-create the data with `{prepare_command(data_dir)}`") from None
    if hashlib.sha256(content).hexdigest() != meta["tokenizer_sha256"]:
        raise DataError(f"{path} does not match meta.json's tokenizer_sha256: it changed after it "
                        "was written, so the token ids no longer mean its tokens; put back the "
                        f"original, or re-create the data with `{prepare_command(data_dir)}`")
    return content.decode()


def write_meta(folder, meta: dict) -> None:
    """Write meta.json (atomically, so it is never half-written) and a trained tokenizer's file
    beside it: meta.json keeps its name and sha256, not its text (read_meta puts that back)."""
    folder = Path(folder)
    if "tokenizer_json" in meta:
        (folder / meta["tokenizer_file"]).write_bytes(meta["tokenizer_json"].encode())
        meta = {key: value for key, value in meta.items() if key != "tokenizer_json"}
    tmp = folder / f".meta.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / "meta.json")


# what tells data apart; tokenizer_sha256 tells two trained (bpe) tokenizers apart
IDENTITY = ("dataset", "tokenizer", "encoding", "vocab_size", "chars", "tokenizer_sha256",
            "source_sha256", "tokens")


def data_differences(saved: dict, meta: dict) -> list[str]:
    """The IDENTITY fields in which `meta` differs from `saved` (e.g. a checkpoint's copy of the
    meta it trained on); a field `saved` lacks (data prepared before it was recorded) is skipped."""
    return [key for key in IDENTITY if key in saved and saved[key] != meta.get(key)]


def describe_data(meta: dict) -> str:
    """A dataset's identity for messages: name, tokens, vocab, source hash and split sizes."""
    splits = " + ".join(f"{count:,} {split}" for split, count in (meta.get("tokens") or {}).items())
    return (f"{meta.get('dataset')} ({meta.get('tokenizer')} tokens,"
            f" vocab {meta.get('vocab_size')}, source sha256"
            f" {(meta.get('source_sha256') or 'unrecorded')[:12]}, {splits or 'unknown'} tokens)")


def tokenizer_identity(meta: dict) -> tuple:
    """What makes two datasets' token ids mean the same: the tiktoken encoding (under any name) or
    the tokenizer's kind with its characters or its trained file's sha256, and the vocab size."""
    return (encoding_name(meta), meta.get("chars"), meta["vocab_size"],
            meta.get("tokenizer_sha256"))


def describe_tokenizer(meta: dict) -> str:
    chars = f" of {len(meta['chars'])} characters" if meta.get("chars") else ""
    return f"{meta['tokenizer']} tokens{chars} (vocab {meta['vocab_size']})"


def leaked_documents(meta: dict) -> int:
    """How many val and test documents prepare's leakage audit found verbatim in train (meta.json's
    "leakage"; its unit is there too); 0 for data prepared before the audit or elsewhere."""
    leakage = meta.get("leakage", {})
    return leakage.get("val_in_train", 0) + leakage.get("test_in_train", 0)


def prepare_command(data_dir, arguments=None) -> str:
    """The command that (re)creates data_dir, or runs other arguments on it, for error messages."""
    data_dir = Path(data_dir)
    if arguments is None:
        quoted = shlex.quote(data_dir.name)
        arguments = {"python_stdlib": "", **{name: f" {name}" for name in NAMED_DATASETS}}.get(
            data_dir.name, f" text --input ... --name {quoted}"
        )
        if data_dir.name == "sft" or (data_dir / "train_tokens.npy").exists():
            arguments = f" sft --input ... --name {quoted}"
    if data_dir.parent.resolve() != Path("data").resolve():
        arguments += f" --data_root {shlex.quote(str(data_dir.parent))}"
    return "python prepare.py" + arguments


# ---- tokenizers --------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids; decode drops ids that are not text (end-of-text, ids past the vocab)."""

    vocab_size: int
    eot_id: int | None = None
    reads_text = True  # whether encode_chunks takes str chunks (else raw bytes)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    @property
    def dtype(self) -> np.dtype:
        """What its ids are stored as: uint16, or uint32 for a vocabulary over 65,536 ids."""
        return np.dtype("<u2") if self.vocab_size <= 2**16 else np.dtype("<u4")

    def encode_chunks(self, chunks: list) -> list[np.ndarray]:
        """Tokenize a batch of chunks into arrays of self.dtype; prepare's fast path."""
        raise NotImplementedError

    def document_start(self) -> list[int]:
        """Ids that open a new document, for unprompted sampling: end-of-text, else a newline."""
        return [self.eot_id] if self.eot_id is not None else self.encode("\n")

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        is_text = (ids >= 0) & (ids < self.vocab_size)
        if self.eot_id is not None:
            is_text &= ids != self.eot_id
        return self._decode_text_ids(ids[is_text])

    def _decode_text_ids(self, ids: np.ndarray) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus end-of-text 256: any text, nothing to learn or download."""

    vocab_size = 257
    eot_id = 256
    reads_text = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chunks(self, chunks: list) -> list[np.ndarray]:
        return [np.frombuffer(chunk, dtype=np.uint8).astype(self.dtype) for chunk in chunks]

    def _decode_text_ids(self, ids: np.ndarray) -> str:
        return ids.astype(np.uint8).tobytes().decode(errors="replace")


class CharTokenizer(Tokenizer):
    """One id per distinct source character, in code point order (nanoGPT's shakespeare_char)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._code_points = _code_points(chars)  # sorted: searchsorted maps a character to its id

    def encode(self, text: str) -> list[int]:
        return self._encode(text).tolist()

    def encode_chunks(self, chunks: list) -> list[np.ndarray]:
        return [self._encode(chunk) for chunk in chunks]

    def _encode(self, text: str) -> np.ndarray:
        code_points = _code_points(text)
        ids = np.minimum(np.searchsorted(self._code_points, code_points), self.vocab_size - 1)
        unknown = self._code_points[ids] != code_points
        if unknown.any():
            missing = "".join(sorted({chr(c) for c in code_points[unknown]}))
            raise DataError(f"characters {missing!r} are not in this char vocabulary;"
                            " leave them out of the text")
        return ids.astype(self.dtype)

    def _decode_text_ids(self, ids: np.ndarray) -> str:
        return self._code_points[ids].tobytes().decode("utf-32-le")


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE encoding, any tiktoken knows by name; batches are tokenized on all cores."""

    def __init__(self, encoding_name: str):
        self.encoding = _load_tiktoken(encoding_name)
        self.vocab_size = self.encoding.n_vocab
        self.eot_id = (self.encoding.eot_token if EOT_TEXT in self.encoding.special_tokens_set
                       else None)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_chunks(self, chunks: list) -> list[np.ndarray]:
        batch = self.encoding.encode_ordinary_batch(chunks, num_threads=os.cpu_count() or 1)
        return [np.array(ids, dtype=self.dtype) for ids in batch]

    def _decode_text_ids(self, ids: np.ndarray) -> str:
        return b"".join(map(self._token_bytes, ids.tolist())).decode(errors="replace")

    def _token_bytes(self, token: int) -> bytes:
        """A token's bytes; none for an id the encoding leaves unassigned (cl100k_base's 100256),
        which a model can still sample."""
        try:
            return self.encoding.decode_single_token_bytes(token)
        except KeyError:
            return b""


def _load_tiktoken(name: str):
    """The encoding from tiktoken's cache (TIKTOKEN_CACHE_DIR), else downloaded there, saying so."""
    if name not in tiktoken.list_encoding_names():
        known = ", ".join(tiktoken.list_encoding_names())
        raise DataError(f"unknown tokenizer {name!r}; use byte, char, bpe, gpt2 or a tiktoken"
                        f" encoding ({known})")
    download = tiktoken.load.read_file  # which tiktoken calls, silently, only for a file not cached

    def announced_download(url):
        print(f"downloading {url} for tiktoken encoding {name}, once: tiktoken keeps it in"
              " TIKTOKEN_CACHE_DIR (if unset, the temporary folder's data-gym-cache)")
        return download(url)

    tiktoken.load.read_file = announced_download
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError) as e:  # a cache miss downloads: a network error or a hash mismatch
        reason = " ".join(str(e).split())  # one line
        raise DataError(
            f"tiktoken encoding {name!r} is not in tiktoken's cache and could not be downloaded"
            f" ({reason}); connect to the internet once, or set TIKTOKEN_CACHE_DIR to a folder that"
            " holds its file"
        ) from None
    finally:
        tiktoken.load.read_file = download


class BPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer that prepare.py trained (preparation/bpe.py), run by Hugging Face
    tokenizers from its tokenizer.json text; batches are tokenized on all cores."""

    def __init__(self, tokenizer_json: str):
        self.tokenizer_json = tokenizer_json
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        # text is text: a literal "<|endoftext|>" is not the special token
        self.backend.encode_special_tokens = True
        self.vocab_size = self.backend.get_vocab_size()
        self.eot_id = self.backend.token_to_id(EOT_TEXT)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_chunks(self, chunks: list) -> list[np.ndarray]:
        encodings = self.backend.encode_batch(chunks, add_special_tokens=False)
        return [np.array(encoding.ids, dtype=self.dtype) for encoding in encodings]

    def _decode_text_ids(self, ids: np.ndarray) -> str:
        return self.backend.decode(ids.tolist())


def get_tokenizer(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer from meta alone (read_meta's, or a checkpoint's copy of it)."""
    kind = meta["tokenizer"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "bpe":
        return BPETokenizer(meta["tokenizer_json"])
    return TiktokenTokenizer(encoding_name(meta))


def encoding_name(meta: dict) -> str:
    """The tiktoken encoding a meta names (older metas name it by their tokenizer, as gpt2), or
    the tokenizer's kind for a char or bpe one."""
    kind = meta["tokenizer"]
    return meta.get("encoding") or TIKTOKEN_ALIASES.get(kind, kind)


def is_gpt2_bpe(meta: dict) -> bool:
    """Whether a dataset's tokens are GPT-2's BPE (which its weights read), under either name."""
    return meta.get("encoding") == TIKTOKEN_ALIASES["gpt2"]


def tokenizer_meta(tokenizer: Tokenizer) -> dict:
    meta = {
        "encoding": tokenizer.encoding.name if isinstance(tokenizer, TiktokenTokenizer) else None,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
    }
    if isinstance(tokenizer, CharTokenizer):
        meta["chars"] = tokenizer.chars
    if isinstance(tokenizer, BPETokenizer):
        text = tokenizer.tokenizer_json
        meta.update(tokenizer_file=TOKENIZER_FILE,
                    tokenizer_sha256=hashlib.sha256(text.encode()).hexdigest(), tokenizer_json=text)
    return meta


def prepare_default(data_dir):
    """Run `python prepare.py` (the default dataset) as its own command, as a user would, so that
    reading never imports the pipeline; its error message or None."""
    print(f"preparing the default dataset in {data_dir} (Python's standard library, byte tokens)")
    command = [sys.executable, str(Path(__file__).with_name("prepare.py")),
               "--data_root", str(data_dir.parent)]
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # like SIGINT, stops it
    try:  # (the child, if running, is killed; the next preparation removes its temporary folder)
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, check=False)
    except KeyboardInterrupt:
        return ("stopped by a signal (SIGINT or SIGTERM) while preparing the default dataset, "
                "before any training; run the same command again to prepare it and train")
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    if result.returncode == 0:
        return None
    return (result.stderr.strip().removeprefix("error: ")
            or f"prepare.py failed with exit status {result.returncode}")


# ---- fine-tuning examples --------------------------------------------------------------------


def sft_turn(role: str, content: str | None) -> list:
    """One chat turn as the sft template renders it: (text, trained) pieces, each text tokenized on
    its own, None for the end-of-text token. An assistant's content and its end token are trained;
    content None is the assistant's header alone, where a reply starts (sample.py --chat)."""
    if role != "assistant":
        return [(f"{SFT_HEADERS[role]}{content}\n\n", 0)]
    return [(SFT_HEADERS[role], 0), *([] if content is None else [(content, 1), (None, 1)])]


def render_sft(pieces: list, tokenizer) -> tuple[list, list]:
    """(token ids, loss mask) of the sft template's (text, trained) pieces."""
    ids, mask = [], []
    for text, trained in pieces:
        new = [tokenizer.eot_id] if text is None else tokenizer.encode(text)
        ids.extend(new)
        mask.extend([trained] * len(new))
    return ids, mask


def load_sft(data_dir, split: str):
    """(tokens, loss mask, offsets) of an sft split, memory-mapped; see the module docstring."""
    data_dir = Path(data_dir)
    try:
        tokens, mask, offsets = (np.load(data_dir / f"{split}_{name}.npy", mmap_mode="r")
                                 for name in ("tokens", "mask", "offsets"))
    except (OSError, ValueError) as e:
        raise DataError(f"the {split} split of {data_dir} cannot be read ({e}); "
                        f"run `{prepare_command(data_dir)}` again") from None
    if len(mask) != len(tokens) or len(offsets) < 1 or offsets[-1] != len(tokens):
        raise DataError(f"the {split} arrays of {data_dir} disagree in length, so they are "
                        f"damaged; run `{prepare_command(data_dir)}` again")
    return tokens, mask, offsets


# ---- batch samplers ----------------------------------------------------------------------------


class Windows:
    """Windows of block_size + 1 tokens from a split's memmapped shards (x = first T, y = last T).

    The shard files stay open from the start, so a run reads the data it started with even if the
    dataset is prepared again meanwhile; each batch maps them afresh, since a long-lived memmap of a
    large corpus keeps every page it touched and grows the process's memory over a run.
    """

    def __init__(self, data_dir, split, block_size, vocab_size):
        self.paths = shard_paths(data_dir, split)
        self.block_size, self.vocab_size = block_size, vocab_size
        allow_open_files(len(self.paths))
        self.files, counts, self.dtypes = zip(*(open_shard(p) for p in self.paths))
        self.lengths = np.array(counts, dtype=np.int64)
        self.starts_per_shard = np.maximum(self.lengths - block_size, 0)
        self.total_starts, self.tokens = int(self.starts_per_shard.sum()), int(self.lengths.sum())
        self.rows_per_epoch = self.tokens / block_size
        self.summary = f"{self.tokens:,} tokens"
        if self.total_starts == 0:
            raise DataError(f"the {split} split of {data_dir} has {self.tokens} tokens, too few "
                            f"for block_size {block_size}; lower --block_size or prepare more data")

    def close(self):
        """Close the shard files: for a split read only at set-up (val, test), once its batches
        are drawn."""
        for file in self.files:
            file.close()

    def batch(self, starts):
        """(x, y) int64 tensors for windows at these global starts (over the shards in order)."""
        starts = np.asarray(starts, dtype=np.int64)
        first_start = np.cumsum(self.starts_per_shard) - self.starts_per_shard
        shard_of = np.searchsorted(first_start, starts, side="right") - 1
        window = np.empty((len(starts), self.block_size + 1), dtype=np.int64)
        columns = np.arange(self.block_size + 1)
        for s in np.unique(shard_of):
            rows = shard_of == s
            tokens = map_tokens(self.files[s], self.lengths[s], self.dtypes[s])
            tokens = tokens.view(np.ndarray)  # no copy (memmap slicing is slow)
            window[rows] = tokens[(starts[rows] - first_start[s])[:, None] + columns]
        if int(window.max()) >= self.vocab_size:
            raise DataError(f"token id {int(window.max())} in the data is >= the model's "
                            f"vocab_size {self.vocab_size}; the shards do not match meta.json, "
                            "prepare them again")
        return as_tensors(window[:, :-1], window[:, 1:])

    def random_batch(self, seed, index, batch_size):
        """Training micro-batch number `index`: random windows drawn from (seed, index) alone, so
        the sampler's whole state is one integer and any process can produce any batch."""
        rng = np.random.default_rng([seed, index])
        return self.batch(rng.integers(0, self.total_starts, size=batch_size))

    def fixed_batches(self, n_batches, batch_size):
        """Evaluation batches: evenly spaced windows, the same at every evaluation and every run."""
        starts = np.linspace(0, self.total_starts - 1, n_batches * batch_size).astype(np.int64)
        return [self.batch(chunk) for chunk in np.split(starts, n_batches)]

    def leading_batches(self, n_tokens, batch_size):
        """Evaluation batches that tile the split's first n_tokens tokens (a multiple of batch_size
        x block_size) with back-to-back windows, each target the next token: how the GPT speedruns
        measure FineWeb val loss."""
        # the first shard's tokens (a window needs one more)
        first_shard = int(self.starts_per_shard[0]) + self.block_size
        if n_tokens + 1 > first_shard:
            raise DataError(f"val_tokens {n_tokens:,} needs {n_tokens + 1:,} tokens in the first "
                            f"val shard, which holds {first_shard:,}; lower --val_tokens")
        starts = np.arange(0, n_tokens, self.block_size)
        return [self.batch(chunk) for chunk in np.split(starts, len(starts) // batch_size)]


class Examples:
    """Fine-tuning examples from `prepare.py sft`: the same interface as Windows, but a row is one
    example, its prompt's targets -100 (no loss, no gradient) and its padding too.

    With `pack`, a training row is instead the block_size + 1 tokens that start at an example,
    examples back to back (the last cut off where the row ends): no padding, but attention crosses
    from an example into those before it in the row. Evaluation is always one example per row.
    """

    def __init__(self, data_dir, split, block_size, vocab_size, pack=False):
        self.ids, self.trained, self.offsets = load_sft(data_dir, split)
        self.block_size, self.pack = block_size, pack
        self.count, self.tokens = len(self.offsets) - 1, len(self.ids)
        longest = int(np.diff(self.offsets).max(initial=0))
        if self.count == 0:
            raise DataError(f"the {split} split of {data_dir} holds no examples;"
                            " prepare more records")
        if longest > block_size + 1:
            raise DataError(f"{data_dir} holds examples of up to {longest} tokens, more than "
                            f"block_size + 1 = {block_size + 1}; raise --block_size or prepare it "
                            f"with --block_size {block_size} (which drops longer examples)")
        if int(self.ids.max()) >= vocab_size:
            raise DataError(f"token id {int(self.ids.max())} in {data_dir} is >= the model's "
                            f"vocab_size {vocab_size}; the files do not match meta.json, prepare "
                            "them again")
        self.rows_per_epoch = self.tokens / block_size if pack else self.count
        self.summary = (f"{self.count:,} examples ({self.tokens:,} tokens,"
                        f" {int(self.trained.sum()):,} trained)")

    def rows(self, examples, packed):
        """(x, y) for these example numbers: y is x shifted by one, -100 for untrained targets."""
        x = np.zeros((len(examples), self.block_size), dtype=np.int64)
        y = np.full((len(examples), self.block_size), -100, dtype=np.int64)
        for row, example in enumerate(examples):
            start = self.offsets[example]
            end = start + self.block_size + 1 if packed else self.offsets[example + 1]
            span = np.arange(start, end) % self.tokens  # a packed row wraps to the first examples
            ids, trained = self.ids[span].astype(np.int64), self.trained[span[1:]].astype(bool)
            x[row, :len(span) - 1] = ids[:-1]
            y[row, :len(span) - 1] = np.where(trained, ids[1:], -100)
        return as_tensors(x, y)

    def random_batch(self, seed, index, batch_size):
        rng = np.random.default_rng([seed, index])
        return self.rows(rng.integers(0, self.count, size=batch_size), self.pack)

    def fixed_batches(self, n_batches, batch_size):
        examples = np.linspace(0, self.count - 1, n_batches * batch_size).astype(np.int64)
        return [self.rows(chunk, packed=False) for chunk in np.split(examples, n_batches)]


def as_tensors(*arrays):
    """The arrays as contiguous tensors (a slice that is not contiguous is copied). torch is
    imported here, not at the top, so that prepare.py, which uses this module for the format and
    tokenizers, starts without it."""
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
