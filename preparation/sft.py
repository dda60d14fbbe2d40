"""Fine-tuning records (sft): JSON Lines of prompt/completion or chat messages, rendered by the
template in prepare.py's docstring into token ids plus a loss mask, split by record, saved as .npy
arrays."""

import hashlib
import json
from pathlib import Path

import numpy as np

from data import SFT_HEADERS, SFT_TEMPLATE, DataError, Tokenizer, render_sft, sft_turn, write_meta
from preparation.bpe import train_bpe
from preparation.common import (
    LeakageAudit,
    check_inputs_survive,
    dataset_meta,
    document_hash,
    input_files,
    new_folder,
    tokenizer_without_source,
)

DEFAULT_SFT_BLOCK_SIZE = 1024  # GPT-2's context


def _sft_records(files: list[Path]):
    """(where, record) for every non-blank line of the JSON Lines files, where = "file:line"."""
    for path in files:
        with open(path, "rb") as f:  # bytes, decoded per line, so a non-UTF-8 line can be named
            for number, line in enumerate(f, 1):
                where = f"{path}:{number}"
                try:
                    # -sig: a byte order mark (some editors write one) is skipped
                    text = line.decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where} is not UTF-8 ({e.reason}); "
                                    "save the file as UTF-8") from None
                if text.strip():
                    try:
                        yield where, json.loads(text)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where} is not a JSON object ({e.msg}); "
                                        "write one record per line") from None


def _pieces(record, where: str):
    """One record rendered by the template in prepare.py's docstring, before tokenizing: its pieces
    (text, trained), each text tokenized on its own, None standing for end-of-text; None if nothing
    trains."""
    if (not isinstance(record, dict)
            or ("messages" in record) == ("prompt" in record or "completion" in record)):
        raise DataError(f"{where} needs either prompt and completion or messages (not both); "
                        "see prepare.py's doc")
    pieces = [(None, 0)]
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list):
            raise DataError(f"{where}: messages must be a list of {{role, content}} objects")
        for turn in turns:
            role = turn.get("role") if isinstance(turn, dict) else None
            if role not in SFT_HEADERS:
                raise DataError(f"{where}: unknown role {role!r}; use system, user or assistant")
            pieces += sft_turn(role, _record_text(turn.get("content"), where, f"{role} content"))
    else:
        if "prompt" not in record or "completion" not in record:
            raise DataError(f"{where} needs both prompt and completion")
        pieces += [(_record_text(record["prompt"], where, "prompt"), 0),
                   (_record_text(record["completion"], where, "completion"), 1), (None, 1)]
    # "": only its end token would train
    return pieces if any(text for text, trained in pieces if trained) else None


def _record_text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, not {type(value).__name__}")
    try:
        value.encode()  # a JSON escape like "\ud800" gives a lone surrogate, which is not text
    except UnicodeEncodeError:
        raise DataError(f"{where}: {what} holds a lone surrogate (an escape like \\ud800); "
                        "fix that escape") from None
    return value


def val_records(n: int, val_fraction: float) -> np.ndarray:
    """Which of n records are held out: max(1, round(val_fraction * n)) of them, spread evenly."""
    return _spread(n, max(1, round(val_fraction * n)))


def _spread(n: int, k: int) -> np.ndarray:
    i = np.arange(n)
    return (i + 1) * k // n > i * k // n


def record_splits(n: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Each record's split: the held-out ones (val_records) are val, except that with test_fraction
    on, t = max(1, round(test_fraction * n)) of them, spread evenly among them, are test. Train is
    the same either way."""
    splits = np.full(n, "train", dtype=object)
    held = val_records(n, val_fraction).nonzero()[0]
    if held.size == n:
        raise DataError(f"--val_fraction {val_fraction} leaves no train record of {n}; lower it")
    splits[held] = "val"
    if test_fraction:
        t = max(1, round(test_fraction * n))
        if t >= held.size:
            raise DataError(f"--test_fraction {test_fraction} takes all {held.size} held-out "
                            f"record(s) of {n}, leaving no val record; raise --val_fraction, of "
                            "which test is a part")
        splits[held[_spread(held.size, t)]] = "test"
    return splits


def _tokenizer(name: str, vocab_size, train_pieces: list) -> Tokenizer:
    """bpe learns its vocabulary from the train records' texts alone; the others need nothing."""
    if name == "bpe":
        return train_bpe((text for pieces in train_pieces for text, _ in pieces if text),
                         vocab_size)
    tok = tokenizer_without_source(name)
    if tok.eot_id is None:
        raise DataError(f"tokenizer {name} has no end-of-text token to end completions; "
                        "use gpt2 or byte")
    return tok


def prepare_sft(out_dir: Path, inputs, tokenizer_name: str, vocab_size, val_fraction: float,
                test_fraction: float, block_size: int) -> dict:
    files = input_files(inputs or [])
    files = sorted(files, key=lambda path: (files[path], path))
    if not files:
        raise DataError("sft needs --input: JSON Lines files of prompt/completion or messages "
                        "records")
    check_inputs_survive(files, out_dir)
    records = [_pieces(record, where) for where, record in _sft_records(files)]  # each checked
    if len(records) < 2:
        raise DataError(f"{len(records)} record(s) in the input; sft needs at least 2 "
                        "(one train, one val)")
    rendered = list(zip(records, record_splits(len(records), val_fraction, test_fraction)))
    tok = _tokenizer(tokenizer_name, vocab_size,
                     [pieces for pieces, split in rendered if pieces and split == "train"])
    kept = {"train": [], "val": [], **({"test": []} if test_fraction else {})}
    dropped = {"nothing_to_train": 0, "too_long": 0}
    for pieces, split in rendered:
        example = None if pieces is None else render_sft(pieces, tok)
        if example is None:
            dropped["nothing_to_train"] += 1
        elif len(example[0]) > block_size + 1:
            dropped["too_long"] += 1
        else:
            kept[split].append(example)
    for split, examples in kept.items():
        if not examples:
            raise DataError(f"no {split} example is left after dropping {dropped}; add records or "
                            "raise --block_size")
    audit = LeakageAudit("record", kept)  # a record as rendered: its token ids
    for split, examples in kept.items():
        for ids, _ in examples:
            audit.add(split, document_hash(np.asarray(ids, dtype=tok.dtype).tobytes()))
    with new_folder(out_dir) as folder:
        counts = {split: _write_sft_split(folder, split, examples, tok.dtype)
                  for split, examples in kept.items()}
        source_hash = hashlib.sha256()
        for path in files:
            source_hash.update(path.read_bytes())
        test = {"test_fraction": test_fraction} if test_fraction else {}
        meta = dataset_meta("sft", tokenizer_name, tok, format="sft", template=SFT_TEMPLATE,
                     block_size=block_size, examples={split: c[0] for split, c in counts.items()},
                     tokens={split: c[1] for split, c in counts.items()},
                     trained_tokens={split: c[2] for split, c in counts.items()},
                     max_example_tokens=max(len(ids) for examples in kept.values()
                                            for ids, _ in examples),
                     dropped=dropped, source_bytes=sum(path.stat().st_size for path in files),
                     source_sha256=source_hash.hexdigest(), val_fraction=val_fraction, **test,
                     leakage=audit.report())
        meta["shard_format"] = "sft npy v1"
        write_meta(folder, meta)
    split_counts = " + ".join(f"{c[0]:,} {split}" for split, c in counts.items())
    print(f"sft: {len(records):,} records -> {split_counts} examples; "
          f"dropped {dropped['too_long']:,} longer than block_size + 1 = {block_size + 1} tokens "
          f"and {dropped['nothing_to_train']:,} with nothing to train")
    return meta


def _write_sft_split(folder: Path, split: str, examples: list,
                     dtype: np.dtype) -> tuple[int, int, int]:
    """Write a split's three arrays, the tokens as `dtype`; (examples, tokens, trained tokens)."""
    ids = np.concatenate([np.asarray(ids, dtype=dtype) for ids, _ in examples])
    mask = np.concatenate([np.asarray(mask, dtype=np.uint8) for _, mask in examples])
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in examples])]).astype(np.int64)
    for name, array in (("tokens", ids), ("mask", mask), ("offsets", offsets)):
        np.save(folder / f"{split}_{name}.npy", array)
    return len(examples), len(ids), int(mask.sum())
