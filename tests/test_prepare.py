import hashlib
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import PLAY, run_here

import data
import preparation.common
import preparation.files
import preparation.sft
import preparation.web
import prepare
from data import DataError

REPO = Path(__file__).resolve().parents[1]


def split_tokens(data_dir, split):
    return np.concatenate([data.load_shard(path) for path in data.shard_paths(data_dir, split)])


def folder_bytes(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def write_files(root, files):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


# ---- shards ------------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    tokens = (np.arange(1000) * 97 % 65536).astype(np.uint16)
    path = tmp_path / "train_000000.bin"
    data.write_shard(path, tokens)

    header = np.fromfile(path, dtype="<i4", count=data.HEADER_INTS)
    assert header[:3].tolist() == [20240520, 1, 1000]  # llm.c's GPT-2 shard header
    assert not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * 1000
    loaded = data.load_shard(path)
    assert loaded.dtype == np.uint16 and not loaded.flags.writeable
    np.testing.assert_array_equal(loaded, tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.bin"]  # no temporary file left


def test_write_shard_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError):
        data.write_shard(tmp_path / "x.bin", np.array([1, 70000]))


def corrupt(data: bytearray, what: str) -> bytearray:
    header = np.frombuffer(data, dtype="<i4", count=3).copy()
    if what == "magic":
        header[0] = 12345
    elif what == "version":
        header[1] = 2
    elif what == "count":
        header[2] += 1
    elif what == "truncated":
        return data[:-2]
    elif what == "header":
        return data[:100]
    data[:12] = header.tobytes()
    return data


@pytest.mark.parametrize("what", ["magic", "version", "count", "truncated", "header"])
def test_load_shard_rejects_bad_shards(tmp_path, what):
    path = tmp_path / "val_000000.bin"
    data.write_shard(path, np.arange(10, dtype=np.uint16))
    path.write_bytes(corrupt(bytearray(path.read_bytes()), what))
    with pytest.raises(DataError, match="val_000000.bin"):
        data.load_shard(path)


def test_shard_paths_finds_llmc_names_in_order(tmp_path):
    for name in ["fineweb_train_000002.bin", "fineweb_val_000000.bin", "fineweb_train_000001.bin"]:
        data.write_shard(tmp_path / name, np.zeros(3, dtype=np.uint16))
    (tmp_path / "meta.json").write_text("{}")
    assert [p.name for p in data.shard_paths(tmp_path, "train")] == [
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
    ]
    assert [p.name for p in data.shard_paths(tmp_path, "val")] == ["fineweb_val_000000.bin"]


def test_shard_paths_without_shards_names_the_command(tmp_path):
    with pytest.raises(DataError, match="no val shards .*python prepare.py shakespeare_char"):
        data.shard_paths(tmp_path / "shakespeare_char", "val")


# ---- datasets ----------------------------------------------------------------------------------


def test_shakespeare_char_matches_nanogpt_split(tmp_path):
    """nanoGPT's split, on the play (tiny shakespeare's 65 characters): the first 90% of the
    characters train, the rest val, the vocabulary the sorted distinct characters (on tiny
    shakespeare itself: 1,003,854 train and 111,540 val tokens of its 1,115,394 characters)."""
    data_dir = prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=tmp_path)

    meta = data.read_meta(data_dir)
    assert data_dir == tmp_path / "shakespeare_char"
    text = PLAY.read_text()
    assert meta["vocab_size"] == 65 and len(meta["chars"]) == 65 and meta["eot_id"] is None
    assert meta["chars"] == "".join(sorted(set(text)))
    train_chars = int(len(text) * 0.9)
    assert meta["tokens"] == {"train": train_chars, "val": len(text) - train_chars}
    assert meta["source_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    tokenizer = data.get_tokenizer(meta)
    train, val = (tokenizer.decode(split_tokens(data_dir, "train")),
                  tokenizer.decode(split_tokens(data_dir, "val")))
    assert train == text[: int(len(text) * 0.9)]
    assert train + val == text


def test_shakespeare_char_uses_and_keeps_the_cached_download(tmp_path, monkeypatch):
    cache = tmp_path / "shakespeare_char" / "input.txt"
    cache.parent.mkdir()
    cache.write_bytes(PLAY.read_bytes()[:20_000])

    def no_network(*args, **kwargs):
        raise AssertionError("the cached input.txt should have been used")

    monkeypatch.setattr(preparation.files.urllib.request, "urlopen", no_network)
    for _ in range(2):  # the second run replaces the folder that holds the cache
        data_dir = prepare.prepare("shakespeare_char", data_root=tmp_path)
        assert cache.read_bytes() == PLAY.read_bytes()[:20_000]
    assert data.read_meta(data_dir)["source_bytes"] == 20_000


def test_shakespeare_char_download_failure_suggests_input(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(preparation.files.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="--input PATH"):
        prepare.prepare("shakespeare_char", data_root=tmp_path)
    assert not (tmp_path / "shakespeare_char" / "input.txt").exists()


def test_gpt2_round_trips_text_exactly(tmp_path):
    text = ("def f(x):\n    return x  # café, naïve, 東京\n" * 40
            + "literal <|endoftext|> stays text\n")
    source = tmp_path / "notes.txt"
    source.write_text(text)

    data_dir = prepare.prepare("text", inputs=[str(source)], tokenizer="gpt2",
                               data_root=tmp_path / "data")

    meta = data.read_meta(data_dir)
    assert (meta["tokenizer"], meta["encoding"]) == ("gpt2", "r50k_base")
    assert (meta["vocab_size"], meta["eot_id"]) == (50257, 50256)
    tokens = np.concatenate([split_tokens(data_dir, "train"), split_tokens(data_dir, "val")])
    assert tokens[-1] == 50256 and (tokens == 50256).sum() == 1  # one document, one eot
    assert data.get_tokenizer(meta).decode(tokens) == text


def byte_corpus():
    return {
        "a.txt": b"alpha line one\nalpha line two\n" * 3,
        "b.md": b"# beta\n\nsome markdown text\n" * 5,
        "sub/c.py": b"print('gamma')\n" * 7,
        "sub/deeper/d.txt": b"delta delta delta\n" * 4,
        ".hidden.txt": b"skipped: hidden file\n",
        ".git/config": b"skipped: hidden folder\n",
    }


def expected_byte_splits(files, val_fraction):
    """Independent model of the split: order by sha256(name), cut bytes, eot after each document."""
    order = sorted(files, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    positioned, offset = [], 0  # (source position, token); an eot just before its document's end
    for name in order:
        positioned += [(offset + i, byte) for i, byte in enumerate(files[name])]
        offset += len(files[name])
        positioned.append((offset - 0.5, 256))
    cut = int(offset * (1 - val_fraction))
    source = b"".join(files[name] for name in order)
    return [t for p, t in positioned if p < cut], [t for p, t in positioned if p >= cut], source


def test_byte_tokenizer_on_a_folder(tmp_path):
    write_files(tmp_path / "corpus", byte_corpus())
    visible = {name: data for name, data in byte_corpus().items() if not name.startswith(".")}

    data_dir = prepare.prepare("text", inputs=[str(tmp_path / "corpus")],
                               data_root=tmp_path / "data", name="c")

    train, val, source = expected_byte_splits(visible, 0.1)
    assert split_tokens(data_dir, "train").tolist() == train
    assert split_tokens(data_dir, "val").tolist() == val
    meta = data.read_meta(data_dir)
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert meta["source_bytes"] == len(source)
    assert meta["source_sha256"] == hashlib.sha256(source).hexdigest()
    assert ((meta["tokenizer"], meta["encoding"], meta["vocab_size"], meta["eot_id"])
            == ("byte", None, 257, 256))
    assert (np.array(train + val) == 256).sum() == len(visible)


def test_same_input_gives_identical_shards(tmp_path):
    write_files(tmp_path / "corpus", byte_corpus())
    runs = [
        prepare.prepare("text", inputs=[str(tmp_path / "corpus" / "*")], data_root=tmp_path / root,
                        name="c")
        for root in ("one", "two")
    ]
    assert folder_bytes(runs[0]) == folder_bytes(runs[1])


def test_small_shard_tokens_split_into_several_files(tmp_path):
    write_files(tmp_path / "corpus", byte_corpus())
    whole = prepare.prepare("text", inputs=[str(tmp_path / "corpus")], data_root=tmp_path / "whole")
    sharded = prepare.prepare("text", inputs=[str(tmp_path / "corpus")],
                              data_root=tmp_path / "many", shard_tokens=20)

    for split in ("train", "val"):
        paths = data.shard_paths(sharded, split)
        assert len(paths) > 1
        assert all(len(data.load_shard(path)) <= 20 for path in paths)
        np.testing.assert_array_equal(split_tokens(sharded, split), split_tokens(whole, split))


def test_split_lands_on_a_character_boundary(tmp_path):
    text = "a" + "é" * 10  # 21 bytes: byte 18, the 90% cut, is inside an é
    (tmp_path / "t.txt").write_text(text)
    data_dir = prepare.prepare("text", inputs=tmp_path / "t.txt", tokenizer="char",
                               data_root=tmp_path)
    tokenizer = data.get_tokenizer(data.read_meta(data_dir))
    assert tokenizer.decode(split_tokens(data_dir, "train")) == "a" + "é" * 8
    assert tokenizer.decode(split_tokens(data_dir, "val")) == "é" * 2


def test_tiny_chunks_never_split_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(preparation.files, "CHUNK_BYTES", 5)
    monkeypatch.setattr(preparation.files, "BATCH_BYTES", 11)
    text = "ünïcödé without newlines 東京東京東京 " * 3 + "\nand lines\n" * 4
    (tmp_path / "t.txt").write_text(text)
    data_dir = prepare.prepare("text", inputs=[str(tmp_path / "t.txt")], tokenizer="char",
                               data_root=tmp_path)
    tokenizer = data.get_tokenizer(data.read_meta(data_dir))
    assert (tokenizer.decode(split_tokens(data_dir, "train"))
            + tokenizer.decode(split_tokens(data_dir, "val")) == text)


def test_python_stdlib_default(tmp_path):
    data_dir = prepare.prepare(data_root=tmp_path)

    meta = data.read_meta(data_dir)
    assert data_dir == tmp_path / "python_stdlib"
    assert ((meta["dataset"], meta["tokenizer"], meta["vocab_size"])
            == ("python_stdlib", "byte", 257))
    documents = preparation.files.stdlib_files()
    assert all(preparation.files.STDLIB_SKIPPED_FOLDERS.isdisjoint(Path(key).parts)
               for key in documents.values())
    nonempty = sum(path.stat().st_size > 0 for path in documents)  # empty files get no eot
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == meta["source_bytes"] + nonempty
    assert meta["source_bytes"] > 1_000_000
    assert split_tokens(data_dir, "val")[-1] == 256
    assert (meta["leakage"]["unit"] == "file"
            and meta["leakage"]["val_in_train"] == 0)  # the acceptance


# ---- the test split ----------------------------------------------------------------------------


def test_without_a_test_split_the_shards_are_as_before(tmp_path):
    """The play's shards and meta.json as prepare wrote them before test splits and the leakage
    audit existed (sha256 of each shard file), so the default split is unchanged byte for byte;
    meta only gains "leakage"."""
    data_dir = prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=tmp_path)

    assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in data_dir.glob("*.bin")} == {
        "train_000000.bin": "d7c6a65ee919686b41c5aba2b4c43b849cc5aa25cc1bbc8ad89cdc7cf228f881",
        "val_000000.bin": "96c31b4218bf80b1243171225a8bafd315773da09cf5b20ed70b0698cc9e7741"}
    meta = data.read_meta(data_dir)
    assert list(meta) == ["dataset", "tokenizer", "encoding", "vocab_size", "eot_id", "chars",
                          "tokens", "source_bytes", "source_sha256", "val_fraction", "leakage",
                          "shard_format"]
    assert meta["tokens"] == {"train": 43359, "val": 4818} and meta["val_fraction"] == 0.1
    assert not data.has_split(data_dir, "test")
    with pytest.raises(DataError, match="no test shards .* with --test_fraction"):
        data.Windows(data_dir, "test", 8, 65)


def test_test_fraction_is_carved_from_the_end_of_val(tmp_path):
    """The last test_fraction of bytes become test, val the bytes between; train is unchanged."""
    plain = prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=tmp_path / "plain")
    data_dir = prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=tmp_path / "test",
                               test_fraction=0.04)

    assert (data_dir / "train_000000.bin").read_bytes() == (plain / "train_000000.bin").read_bytes()
    assert sorted(path.name for path in data_dir.glob("*.bin")) == [
        "test_000000.bin", "train_000000.bin", "val_000000.bin"]
    text = PLAY.read_text()
    tokenizer = data.get_tokenizer(data.read_meta(data_dir))
    val, test = (tokenizer.decode(split_tokens(data_dir, split)) for split in ("val", "test"))
    assert test == text[int(len(text) * 0.96) :] and val + test == text[int(len(text) * 0.9) :]
    meta = data.read_meta(data_dir)
    assert meta["tokens"] == {"train": 43359, "val": len(val), "test": len(test)}
    assert sum(meta["tokens"].values()) == len(text) and meta["test_fraction"] == 0.04
    assert data.has_split(data_dir, "test")
    windows = data.Windows(data_dir, "test", 8, 65)  # opens like val
    assert windows.tokens == len(test)
    # 33 paragraphs in val without test, one now cut in two
    assert meta["leakage"] == {"unit": "paragraph", "val_docs": 20, "val_in_train": 0,
                               "test_docs": 14, "test_in_train": 0}


def test_test_split_tokens_add_up_with_end_of_text_tokens(tmp_path):
    """Byte tokens of several files: every document's end-of-text lands in exactly one split."""
    write_files(tmp_path / "corpus", byte_corpus())
    corpus = str(tmp_path / "corpus")
    plain = prepare.prepare("text", inputs=[corpus], data_root=tmp_path / "plain", val_fraction=0.3)
    data_dir = prepare.prepare("text", inputs=[corpus], data_root=tmp_path / "test",
                               val_fraction=0.3, test_fraction=0.15)

    np.testing.assert_array_equal(split_tokens(data_dir, "train"), split_tokens(plain, "train"))
    np.testing.assert_array_equal(np.concatenate([split_tokens(data_dir, "val"),
                                                  split_tokens(data_dir, "test")]),
                                  split_tokens(plain, "val"))
    tokens = data.read_meta(data_dir)["tokens"]
    assert (tokens["train"] + tokens["val"] + tokens["test"]
            == sum(data.read_meta(plain)["tokens"].values()))
    assert tokens["test"] > 0 and tokens["val"] > 0


# ---- tokenizers --------------------------------------------------------------------------------


def test_byte_decode_skips_eot_padding_and_bad_utf8():
    tokenizer = data.get_tokenizer({"tokenizer": "byte"})
    ids = tokenizer.encode("hé") + [256, 300] + [0xFF] + tokenizer.encode("!")
    assert tokenizer.decode(ids) == "hé\ufffd!"


def test_char_tokenizer_rejects_unknown_characters():
    tokenizer = data.get_tokenizer({"tokenizer": "char", "chars": "\n abc"})
    assert tokenizer.decode(tokenizer.encode("cab a\n")) == "cab a\n"
    with pytest.raises(DataError, match="'xz'"):
        tokenizer.encode("abzx")


# ---- errors and safety -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["text", "--input", "{tmp}/missing.txt"], "does not exist"),
        (["text", "--input", "{tmp}/empty.txt"], "empty"),
        (["text", "--input", "{tmp}/one_byte.txt"], "too small"),
        (["text", "--input", "{tmp}/*.nothing"], "matched nothing"),
        (["text", "--input", "{tmp}/empty_folder"], "holds no files"),
        (["text"], "--input"),
        (["shakespeare_char", "--input", "{tmp}/latin1.txt"], "not UTF-8"),
        (["text", "--input", "{tmp}/text.txt", "--tokenizer", "nope"], "unknown tokenizer"),
        (["wikipedia"], "unknown dataset"),
        (["--val_fraction", "0"], "--val_fraction"),
        (["--test_fraction", "-0.1"], "--test_fraction must be at least 0"),
        (["--test_fraction", "1"], "--test_fraction must be at least 0 (off) and below 1"),
        (["--test_fraction", "0.1"], "--test_fraction 0.1 must be below --val_fraction 0.1"),
        (["--val_fraction", "0.2", "--test_fraction", "0.3"],
         "raise --val_fraction to hold out both"),
        (["text", "--input", "{tmp}/text.txt", "--test_fraction", "0.09"],
         "too small to give train, val and test"),
        (["--test_tokens", "5"], "--test_tokens and --max_docs are for the web datasets"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, arguments, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "one_byte.txt").write_bytes(b"x")
    (tmp_path / "text.txt").write_text("hello\n" * 10)
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "empty_folder").mkdir()
    argv = [a.format(tmp=tmp_path) for a in arguments] + ["--data_root", str(tmp_path / "data")]

    with pytest.raises(SystemExit) as exit_info:
        prepare.main(argv)

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_failed_prepare_leaves_existing_data_untouched(tmp_path, monkeypatch):
    source = tmp_path / "t.txt"
    source.write_text("first version\n" * 50)
    data_dir = prepare.prepare("text", inputs=[str(source)], data_root=tmp_path / "data", name="t")
    before = folder_bytes(data_dir)

    def disk_full(path, tokens):
        raise OSError("disk full")

    source.write_text("second version\n" * 50)
    monkeypatch.setattr(preparation.common, "write_shard", disk_full)
    with pytest.raises(OSError, match="disk full"):
        prepare.prepare("text", inputs=[str(source)], data_root=tmp_path / "data", name="t")
    assert folder_bytes(data_dir) == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["t"]

    monkeypatch.undo()
    prepare.prepare("text", inputs=[str(source)], data_root=tmp_path / "data", name="t")
    assert folder_bytes(data_dir) != before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["t"]


def test_inputs_inside_the_replaced_folder_are_refused(tmp_path):
    write_files(tmp_path / "data" / "notes", {"a.txt": b"my only copy\n" * 10})
    with pytest.raises(DataError, match="inside the output folder"):
        prepare.prepare("text", inputs=[str(tmp_path / "data" / "notes")],
                        data_root=tmp_path / "data", name="notes")
    assert (tmp_path / "data" / "notes" / "a.txt").exists()


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("python_stdlib", "`python prepare.py --data_root"),
        ("shakespeare_char", "`python prepare.py shakespeare_char --data_root"),
        ("fineweb10B", "`python prepare.py fineweb10B --data_root"),
        ("mine", "`python prepare.py text --input ... --name mine --data_root"),
    ],
)
def test_read_meta_on_a_missing_folder_names_the_command(tmp_path, name, command):
    with pytest.raises(DataError, match="run " + command.replace(".", r"\.")):
        data.read_meta(tmp_path / name)


def test_read_meta_returns_what_prepare_wrote(tmp_path):
    (tmp_path / "t.txt").write_text("hello world\n" * 5)
    data_dir = prepare.prepare("text", inputs=[str(tmp_path / "t.txt")], data_root=tmp_path)
    assert data.read_meta(data_dir) == json.loads((data_dir / "meta.json").read_text())
    assert data.read_meta(data_dir)["shard_format"] == "llm.c v1 uint16"


def test_help_lists_every_option():
    result = run_here("prepare.py", ["--help"])
    for option in ["dataset", "--input", "--tokenizer", "--data_root", "--name", "--val_fraction",
                   "--shard_tokens", "--val_tokens", "--max_docs", "--test_fraction",
                   "--test_tokens", "fineweb10B", "fineweb_edu10B", "openwebtext", "meta"]:
        assert option in result.stdout


def test_the_read_side_names_every_dataset_prepare_knows_by_name():
    """data.NAMED_DATASETS (which error messages use to suggest `python prepare.py <name>`) is the
    read side's copy of the pipeline's names; it must not drift from them."""
    assert set(data.NAMED_DATASETS) == (set(preparation.files.DOWNLOADED)
                                        | set(preparation.web.WEB_DATASETS))
