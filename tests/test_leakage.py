"""prepare.py's leakage audit: held-out (val, test) documents found verbatim in train, reported on
the console and in meta.json, and data.leaked_documents, which train.py reads to warn."""

import hashlib
import json
import sys
from types import SimpleNamespace

import pytest
from conftest import PLAY

import data
import prepare


def test_the_fixture_play_has_no_leakage(data_root):
    meta = data.read_meta(data_root / "shakespeare_char")
    assert meta["leakage"] == {"unit": "paragraph", "val_docs": 33, "val_in_train": 0}
    assert data.leaked_documents(meta) == 0


def test_a_paragraph_copied_from_val_into_train_is_found(tmp_path, capsys):
    """A single file is audited by paragraph; its last speech, copied to its start, stays in val."""
    text = PLAY.read_text()
    last = text.rstrip().rsplit("\n\n", 1)[1]
    # the whitespace around a paragraph is ignored
    (tmp_path / "play.txt").write_text(f"  {last}\n\n\n{text}")

    data_dir = prepare.prepare("shakespeare_char", inputs=[str(tmp_path / "play.txt")],
                               data_root=tmp_path)

    meta = data.read_meta(data_dir)
    assert meta["leakage"]["unit"] == "paragraph" and meta["leakage"]["val_in_train"] == 1
    assert data.leaked_documents(meta) == 1
    assert (f"warning: leakage audit: 1 of {meta['leakage']['val_docs']} val paragraphs also "
            "occur verbatim in train" in capsys.readouterr().out)


@pytest.mark.parametrize(("copied", "expected"), [
    (18, {"val_in_train": 1, "test_in_train": 0}), (19, {"val_in_train": 0, "test_in_train": 1})])
def test_a_file_copied_into_train_is_found_in_val_or_test(tmp_path, copied, expected):
    """Twenty files of equal size: in split order, 0-17 are train, 18 val and 19 test. One of the
    held-out files' bytes replace file 0's, so sizes and order stay, and the audit (by file, with
    several files) finds it."""
    names = sorted((f"{i:02d}.txt" for i in range(20)),
                   key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    contents = [f"file {i:02d}\n".encode() * 20 for i in range(20)]
    contents[0] = contents[copied]
    for name, content in zip(names, contents):
        (tmp_path / name).write_bytes(content)

    data_dir = prepare.prepare("text", inputs=[str(tmp_path / "*.txt")],
                               data_root=tmp_path / "data", test_fraction=0.05)

    leakage = data.read_meta(data_dir)["leakage"]
    assert leakage == {"unit": "file", "val_docs": 1, "test_docs": 1, **expected}
    assert data.leaked_documents({"leakage": leakage}) == 1


def test_a_record_copied_into_train_is_found(tmp_path):
    records = [{"prompt": f"question {i}\n", "completion": f"answer {i}"} for i in range(10)]
    # record 9 (val), its keys reordered
    records[0] = {"completion": "answer 9", "prompt": "question 9\n", "id": 0}
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))

    data_dir = prepare.prepare("sft", inputs=[str(source)], tokenizer="byte", data_root=tmp_path,
                               val_fraction=0.2)

    assert data.read_meta(data_dir)["leakage"] == {"unit": "record", "val_docs": 2,
                                                   "val_in_train": 1}


def test_a_stream_document_copied_into_train_is_found(tmp_path, monkeypatch):
    """Streamed as from the hub (faked as in test_prepare_web.py); empty documents, on both sides,
    are not counted."""
    texts = [f"document number {i} " * (i % 5 + 1) for i in range(40)]
    texts[1] = texts[3] = texts[30] = ""
    texts[20] = texts[2]  # the first documents are val
    records = [{"text": text} for text in texts]
    monkeypatch.setitem(sys.modules, "datasets",
                        SimpleNamespace(load_dataset=lambda *args, **kwargs: iter(records)))

    data_dir = prepare.prepare("fineweb10B", data_root=tmp_path, val_tokens=40)

    meta = data.read_meta(data_dir)
    val = texts[: meta["documents"]["val"]]
    assert 3 < len(val) < 20
    assert meta["leakage"] == {"unit": "document", "val_docs": len(val) - 2, "val_in_train": 1}


def test_leaked_documents_reads_val_and_test():
    assert data.leaked_documents({}) == 0  # prepared before the audit, or shards from llm.c
    assert data.leaked_documents({"leakage": {"unit": "file", "val_docs": 9,
                                              "val_in_train": 0}}) == 0
    leakage = {"unit": "document", "val_docs": 9, "val_in_train": 2, "test_docs": 4,
               "test_in_train": 1}
    assert data.leaked_documents({"leakage": leakage}) == 3
