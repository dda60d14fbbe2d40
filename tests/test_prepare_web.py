import hashlib
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import tiktoken

import data
import prepare
from data import DataError

EOT = 50256


def gpt2():
    return tiktoken.get_encoding("r50k_base")


def make_documents(count=300):
    """Short documents of varied length, with newlines, non-ASCII text and one empty document."""
    words = ["the", "quick", "brown", "fox", "café", "東京", "naïve", "jumps\n", "over", "  lazy",
             "dog."]
    documents = [f"doc {i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(i % 40))
                 for i in range(count)]
    documents[5] = ""
    return documents


def write_jsonl(path, documents):
    path.write_text("".join(json.dumps({"id": i, "text": text}) + "\n"
                            for i, text in enumerate(documents)))
    return path


def expected_stream(documents, val_tokens):
    """Independent model of the rule: eot before each document; the first val_tokens tokens are val,
    the rest of the document crossing that count is dropped, and train is every later document."""
    val, crossed = [], len(documents)
    for i, text in enumerate(documents):
        val += [EOT] + gpt2().encode_ordinary(text)
        if len(val) >= val_tokens:
            crossed = i
            break
    train = [token for text in documents[crossed + 1 :]
             for token in [EOT] + gpt2().encode_ordinary(text)]
    return val[:val_tokens], train, crossed + 1


def split_tokens(data_dir, split):
    return np.concatenate([data.load_shard(path) for path in data.shard_paths(data_dir, split)])


def shard_bytes(data_dir):
    return {path.name: path.read_bytes() for path in sorted(data_dir.glob("*.bin"))}


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# ---- the stream --------------------------------------------------------------------------------


def test_jsonl_gives_val_then_train_shards(tmp_path, capsys):
    documents = make_documents()
    source = write_jsonl(tmp_path / "docs.jsonl", documents)

    data_dir = prepare.prepare("fineweb10B", inputs=[str(source)], data_root=tmp_path / "data",
                               val_tokens=500, shard_tokens=1000)

    assert data_dir == tmp_path / "data" / "fineweb10B"
    val, train, val_documents = expected_stream(documents, 500)
    names = sorted(path.name for path in data_dir.glob("*.bin"))
    assert (names[-1] == "val_000000.bin"
            and names[:-1] == [f"train_{i:06d}.bin" for i in range(len(names) - 1)])
    assert len(names) >= 5
    for name in names:
        header = np.fromfile(data_dir / name, dtype="<i4", count=data.HEADER_INTS)
        count = (data_dir / name).stat().st_size // 2 - data.HEADER_BYTES // 2
        assert header[:3].tolist() == [20240520, 1, count] and not header[3:].any()
        # only the last train shard and val are partial
        assert count == 1000 or name in (names[-2], names[-1])
    assert split_tokens(data_dir, "val").tolist() == val
    assert split_tokens(data_dir, "train").tolist() == train
    assert gpt2().decode(train) == "".join("<|endoftext|>" + text
                                           for text in documents[val_documents:])

    meta = data.read_meta(data_dir)
    assert ((meta["dataset"], meta["tokenizer"], meta["encoding"], meta["vocab_size"],
             meta["eot_id"]) == ("fineweb10B", "gpt2", "r50k_base", 50257, EOT))
    assert meta["tokens"] == {"train": len(train), "val": 500}
    assert meta["documents"] == {"train": len(documents) - val_documents, "val": val_documents}
    source_text = "".join(documents).encode()
    assert ((meta["source_bytes"], meta["source_sha256"])
            == (len(source_text), hashlib.sha256(source_text).hexdigest()))
    assert meta["val_tokens"] == 500 and meta["shard_format"] == "llm.c v1 uint16"
    out = capsys.readouterr().out
    assert (f"\r{len(documents):,} docs (" in out and "tokens (" in out
            and f"{len(names)} shards written\n" in out)


def test_val_may_span_several_shards(tmp_path):
    documents = make_documents()
    source = write_jsonl(tmp_path / "docs.jsonl", documents)
    data_dir = prepare.prepare("openwebtext", inputs=[str(source)], data_root=tmp_path,
                               val_tokens=2500, shard_tokens=1000)
    assert [len(data.load_shard(path))
            for path in data.shard_paths(data_dir, "val")] == [1000, 1000, 500]
    val, train, _ = expected_stream(documents, 2500)
    assert split_tokens(data_dir, "val").tolist() == val
    assert split_tokens(data_dir, "train").tolist() == train


def test_max_docs_stops_early(tmp_path):
    documents = make_documents()
    source = write_jsonl(tmp_path / "docs.jsonl", documents)
    data_dir = prepare.prepare("fineweb_edu10B", inputs=[str(source)], data_root=tmp_path,
                               val_tokens=300, max_docs=40)
    meta = data.read_meta(data_dir)
    assert sum(meta["documents"].values()) == 40
    assert split_tokens(data_dir, "train").tolist() == expected_stream(documents[:40], 300)[1]


def test_text_and_parquet_files_read_like_jsonl(tmp_path):
    documents = make_documents(60)
    jsonl = prepare.prepare("fineweb10B",
                            inputs=[str(write_jsonl(tmp_path / "docs.jsonl", documents))],
                            data_root=tmp_path / "jsonl", val_tokens=200, shard_tokens=500)
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(documents):  # one document per file, read in path order
        (folder / f"{i:03d}.txt").write_bytes(text.encode())
    texts = prepare.prepare("fineweb10B", inputs=[str(folder)], data_root=tmp_path / "texts_out",
                            val_tokens=200, shard_tokens=500)
    assert shard_bytes(texts) == shard_bytes(jsonl)
    assert data.read_meta(texts)["source_sha256"] == data.read_meta(jsonl)["source_sha256"]

    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")

    parts = tmp_path / "parquet"
    parts.mkdir()
    for part, start in enumerate(range(0, 60, 25)):
        table = pyarrow.table({"id": list(range(start, start + 25))[: 60 - start],
                               "text": documents[start : start + 25]})
        parquet.write_table(table, parts / f"{part:03d}_00000.parquet", row_group_size=7)
    from_parquet = prepare.prepare("fineweb10B", inputs=[str(parts / "*.parquet")],
                                   data_root=tmp_path / "out", val_tokens=200, shard_tokens=500)
    assert shard_bytes(from_parquet) == shard_bytes(jsonl)


def test_byte_tokenizer_also_leads_each_document_with_eot(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", ["ab", "", "cé", "d"])
    data_dir = prepare.prepare("fineweb10B", inputs=[str(source)], tokenizer="byte",
                               data_root=tmp_path, val_tokens=2)
    assert split_tokens(data_dir, "val").tolist() == [256, 97]  # "ab" cut after "a", "b" dropped
    assert split_tokens(data_dir, "train").tolist() == [256, 256, 99, 0xC3, 0xA9, 256, 100]


def test_test_tokens_are_the_end_of_the_held_out_part(tmp_path):
    """Val is the first val_tokens - test_tokens; its last document is cut there and the rest
    dropped but counted, so test is the stream's tokens from the next document up to val_tokens and
    train is the same as without test."""
    documents = make_documents()
    source = str(write_jsonl(tmp_path / "docs.jsonl", documents))
    plain = prepare.prepare("fineweb10B", inputs=[source], data_root=tmp_path / "plain",
                            val_tokens=500, shard_tokens=1000)
    data_dir = prepare.prepare("fineweb10B", inputs=[source], data_root=tmp_path / "test",
                               val_tokens=500, test_tokens=200, shard_tokens=1000)

    assert ({name: data for name, data in shard_bytes(data_dir).items() if name.startswith("train")}
            == {name: data for name, data in shard_bytes(plain).items()
                if name.startswith("train")})
    stream, ends = [], []  # the stream's tokens, and where each document ends in it
    for text in documents:
        stream += [EOT] + gpt2().encode_ordinary(text)
        ends.append(len(stream))
    val_end = next(end for end in ends if end >= 300)  # the end of the document crossing val's end
    assert split_tokens(data_dir, "val").tolist() == stream[:300]
    assert split_tokens(data_dir, "test").tolist() == stream[val_end:500]
    meta = data.read_meta(data_dir)
    _, _, held_out_documents = expected_stream(documents, 500)
    val_documents = ends.index(val_end) + 1
    assert meta["tokens"] == {"train": data.read_meta(plain)["tokens"]["train"], "val": 300,
                              "test": 500 - val_end}
    assert meta["documents"] == {"train": len(documents) - held_out_documents, "val": val_documents,
                                 "test": held_out_documents - val_documents}
    assert (meta["val_tokens"], meta["test_tokens"]) == (500, 200)
    assert data.Windows(data_dir, "test", 8, 50257).tokens == 500 - val_end


def test_a_document_that_fills_test_is_an_error(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl",
                         ["short", "a long document " * 50, "more", "and more"])
    err = run_main(["fineweb10B", "--input", str(source), "--val_tokens", "20",
                    "--test_tokens", "10", "--data_root", str(tmp_path / "data")], capsys)
    assert "leaving test empty" in err


# ---- the Hugging Face hub ----------------------------------------------------------------------


def fake_datasets(records, calls):
    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        yield from records

    return SimpleNamespace(load_dataset=load_dataset)


@pytest.mark.parametrize(
    ("dataset", "repository", "config"),
    [
        ("fineweb10B", "HuggingFaceFW/fineweb", "sample-10BT"),
        ("fineweb_edu10B", "HuggingFaceFW/fineweb-edu", "sample-10BT"),
        ("openwebtext", "Skylion007/openwebtext", None),
    ],
)
def test_hub_stream_goes_through_the_same_path(tmp_path, monkeypatch, dataset, repository, config):
    documents = make_documents(80)
    calls = []
    records = [{"text": text, "url": f"https://example.com/{i}"}
               for i, text in enumerate(documents)]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(records, calls))

    streamed = prepare.prepare(dataset, data_root=tmp_path / "hub", val_tokens=300,
                               shard_tokens=700)

    assert calls == [((repository, config), {"split": "train", "streaming": True})]
    local = prepare.prepare(dataset, inputs=[str(write_jsonl(tmp_path / "docs.jsonl", documents))],
                            data_root=tmp_path / "local", val_tokens=300, shard_tokens=700)
    assert shard_bytes(streamed) == shard_bytes(local)


def test_without_the_datasets_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    err = run_main(["fineweb10B", "--data_root", str(tmp_path / "data")], capsys)
    assert "pip install datasets" in err and "--input" in err


def failing_stream(*args, **kwargs):
    yield {"text": "a first document"}
    raise ConnectionError("connection reset by peer")


def unreachable_hub(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb' on the Hub "
                          "(LocalEntryNotFoundError)")


@pytest.mark.parametrize("load_dataset", [unreachable_hub, failing_stream])
def test_hub_failure_suggests_input_and_keeps_old_data(tmp_path, monkeypatch, capsys, load_dataset):
    old = tmp_path / "data" / "fineweb10B"
    old.mkdir(parents=True)
    (old / "meta.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))

    err = run_main(["fineweb10B", "--data_root", str(tmp_path / "data"), "--val_tokens", "2"],
                   capsys)

    assert "could not stream HuggingFaceFW/fineweb" in err and "--input" in err
    assert [path.name for path in (tmp_path / "data").iterdir()] == ["fineweb10B"]
    assert [path.name for path in old.iterdir()] == ["meta.json"]


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--input", "{tmp}/bad.jsonl"], "line 2 of"),
        (["--input", "{tmp}/no_text.jsonl"], "line 1 of"),
        (["--input", "{tmp}/list.jsonl"], "line 1 of"),
        (["--input", "{tmp}/number.jsonl"], "has a text of type int, not str"),
        (["--input", "{tmp}/latin1.txt"], "not UTF-8"),
        (["--input", "{tmp}/fake.parquet"], "parquet"),
        (["--input", "{tmp}/docs.jsonl"], "none left for train"),  # default --val_tokens: 100M
        (["--input", "{tmp}/docs.jsonl", "--val_tokens", "3", "--max_docs", "1"],
         "none left for train"),
        (["--input", "{tmp}/docs.jsonl", "--val_fraction", "0.1"], "drop --val_fraction"),
        (["--input", "{tmp}/docs.jsonl", "--val_tokens", "0"], "--val_tokens must be at least 1"),
        (["--input", "{tmp}/docs.jsonl", "--max_docs", "0"], "--max_docs must be at least 1"),
        (["--input", "{tmp}/docs.jsonl", "--test_tokens", "-1"],
         "--test_tokens must be at least 0"),
        (["--input", "{tmp}/docs.jsonl", "--val_tokens", "5", "--test_tokens", "5"],
         "--test_tokens 5 must be below --val_tokens 5"),
        (["--input", "{tmp}/docs.jsonl", "--test_fraction", "0.1"],
         "drop --val_fraction and --test_fraction"),
        (["--input", "{tmp}/docs.jsonl", "--tokenizer", "char"], "char tokenizer"),
        (["--input", "{tmp}/missing.jsonl"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, arguments, message):
    write_jsonl(tmp_path / "docs.jsonl", ["one document", "another one"])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "no_text.jsonl").write_text('{"content": "no text field"}\n')
    (tmp_path / "list.jsonl").write_text('["text"]\n')
    (tmp_path / "number.jsonl").write_text('{"text": 7}\n')
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    argv = (["fineweb10B"] + [a.format(tmp=tmp_path) for a in arguments]
            + ["--data_root", str(tmp_path / "data")])

    err = run_main(argv, capsys)

    assert message in err
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "part.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    err = run_main(["fineweb10B", "--input", str(tmp_path / "part.parquet"),
                    "--data_root", str(tmp_path)], capsys)
    assert "pip install pyarrow" in err


def test_parquet_without_a_text_column(tmp_path, capsys):
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")

    parquet.write_table(pyarrow.table({"body": ["x"]}), tmp_path / "part.parquet")
    err = run_main(["fineweb10B", "--input", str(tmp_path / "part.parquet"),
                    "--data_root", str(tmp_path)], capsys)
    assert "no text column, only body" in err


def test_web_options_are_refused_for_file_datasets(tmp_path, capsys):
    err = run_main(["text", "--input", str(tmp_path), "--max_docs", "5",
                    "--data_root", str(tmp_path)], capsys)
    assert "--max_docs are for the web datasets" in err


# ---- shards made elsewhere ---------------------------------------------------------------------


def test_meta_describes_llmc_shards(tmp_path, capsys):
    data_dir = tmp_path / "data" / "fineweb10B"
    data_dir.mkdir(parents=True)
    shards = [("fineweb_val_000000.bin", 7), ("fineweb_train_000001.bin", 5),
              ("fineweb_train_000002.bin", 4)]
    for name, count in shards:
        data.write_shard(data_dir / name, np.full(count, EOT, dtype=np.uint16))
    with pytest.raises(DataError, match="holds shards but no meta.json.*"
                                        "python prepare.py meta --name fineweb10B"):
        data.read_meta(data_dir)

    prepare.main(["meta", "--name", "fineweb10B", "--data_root", str(tmp_path / "data")])

    meta = data.read_meta(data_dir)
    assert meta == {"dataset": "fineweb10B", "tokenizer": "gpt2", "encoding": "r50k_base",
                    "vocab_size": 50257, "eot_id": EOT, "tokens": {"train": 9, "val": 7},
                    "shard_format": "llm.c v1 uint16"}
    assert "9 train + 7 val gpt2 tokens" in capsys.readouterr().out


def test_meta_rejects_a_bad_shard_and_needs_a_name(tmp_path, capsys):
    data_dir = tmp_path / "fw"
    data_dir.mkdir()
    data.write_shard(data_dir / "fineweb_val_000000.bin", np.zeros(3, dtype=np.uint16))
    (data_dir / "fineweb_train_000001.bin").write_bytes(b"\0" * 100)
    assert "shorter than the 1024-byte header" in run_main(
        ["meta", "--name", "fw", "--data_root", str(tmp_path)], capsys)
    assert not (data_dir / "meta.json").exists()
    assert "meta needs --name" in run_main(["meta", "--data_root", str(tmp_path)], capsys)
