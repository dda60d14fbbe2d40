"""prepare.py sft: the rendering template, the loss mask, the drop rules, the split, the errors."""

import hashlib
import itertools
import json

import numpy as np
import pytest
from conftest import ROOT, run_here

import data
import preparation.files
import preparation.sft
import prepare

EOT = 256  # the byte tokenizer's end-of-text


def write_records(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def prepare_sft(tmp_path, records, **options):
    source = write_records(tmp_path / "records.jsonl", records)
    options = {"tokenizer": "byte", "data_root": tmp_path / "data", **options}
    return prepare.prepare("sft", inputs=[str(source)], **options)


def examples(data_dir, split):
    tokens, mask, offsets = data.load_sft(data_dir, split)
    return [(tokens[a:b].tolist(), mask[a:b].tolist()) for a, b in itertools.pairwise(offsets)]


def byte_ids(text):
    return list(text.encode())


def test_prompt_completion_rendering_and_mask_by_hand(tmp_path):
    folder = prepare_sft(tmp_path, [{"prompt": "Hi\n", "completion": "yo"},
                                    {"prompt": "A", "completion": "B"}], val_fraction=0.5)
    (train,), (val,) = examples(folder, "train"), examples(folder, "val")
    assert train == ([EOT, *byte_ids("Hi\n"), *byte_ids("yo"), EOT], [0, 0, 0, 0, 1, 1, 1])
    assert val == ([EOT, ord("A"), ord("B"), EOT], [0, 0, 1, 1])
    meta = data.read_meta(folder)
    assert meta["format"] == "sft" and meta["examples"] == {"train": 1, "val": 1}
    assert (meta["tokens"] == {"train": 7, "val": 4}
            and meta["trained_tokens"] == {"train": 3, "val": 2})
    assert meta["max_example_tokens"] == 7 and meta["eot_id"] == EOT
    assert meta["template"] == data.SFT_TEMPLATE


def test_chat_rendering_with_gpt2_tokens(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "<|endoftext|>"},
                         {"role": "assistant", "content": "ok"}]}
    folder = prepare_sft(tmp_path, [chat, chat], tokenizer="gpt2", val_fraction=0.5)
    tok = data.get_tokenizer(data.read_meta(folder))
    ids, mask = examples(folder, "train")[0]
    eot = tok.eot_id
    assert tok.encoding.decode(ids) == ("<|endoftext|>System: Be brief.\n\nUser: 2+2?\n\n"
                                        "Assistant: 4<|endoftext|>User: <|endoftext|>\n\n"
                                        "Assistant: ok<|endoftext|>")
    assert ids.count(eot) == 3  # the user's literal "<|endoftext|>" stays text
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [*tok.encode("4"), eot, *tok.encode("ok"), eot]


def test_long_and_untrainable_records_are_dropped_and_counted(tmp_path):
    fits = {"prompt": "a" * 5, "completion": "b" * 5}  # EOT + 10 + EOT: 12 tokens, block_size + 1
    too_long = {"prompt": "a" * 5, "completion": "b" * 6}  # 13 tokens
    empty = {"prompt": "a", "completion": ""}
    no_answer = {"messages": [{"role": "user", "content": "hello"}]}
    empty_answer = {"messages": [{"role": "user", "content": "hello"},
                                 {"role": "assistant", "content": ""}]}
    records = [fits, too_long, empty, no_answer, empty_answer, fits, fits]
    folder = prepare_sft(tmp_path, records, block_size=11, val_fraction=0.2)
    meta = data.read_meta(folder)
    assert meta["dropped"] == {"too_long": 1, "nothing_to_train": 3}
    kept = examples(folder, "train") + examples(folder, "val")
    assert [len(ids) for ids, _ in kept] == [12, 12, 12] and meta["max_example_tokens"] == 12


def test_split_is_even_and_decided_before_dropping(tmp_path):
    assert preparation.sft.val_records(10, 0.2).nonzero()[0].tolist() == [4, 9]
    assert preparation.sft.val_records(3, 0.1).nonzero()[0].tolist() == [2]  # at least one
    records = [{"prompt": str(i), "completion": "x" if i != 4 else ""} for i in range(10)]
    folder = prepare_sft(tmp_path, records, val_fraction=0.2)
    # record 4 was dropped
    assert [bytes(ids[1:-2]).decode() for ids, _ in examples(folder, "val")] == ["9"]
    assert len(examples(folder, "train")) == 8


def test_test_fraction_takes_test_from_the_val_records(tmp_path):
    records = [{"prompt": f"{i}:", "completion": "x"} for i in range(20)]
    plain = prepare_sft(tmp_path, records, val_fraction=0.3, name="plain")
    folder = prepare_sft(tmp_path, records, val_fraction=0.3, test_fraction=0.1, name="test")

    def numbers(folder, split):
        return [int(bytes(ids[1:-2]).decode().rstrip(":")) for ids, _ in examples(folder, split)]

    assert numbers(plain, "val") == [3, 6, 9, 13, 16, 19]  # 6 of 20 spread evenly
    assert (numbers(folder, "val") == [3, 6, 13, 16]
            and numbers(folder, "test") == [9, 19])  # 2 of those 6
    assert numbers(folder, "train") == numbers(plain, "train")
    meta = data.read_meta(folder)
    assert meta["examples"] == {"train": 14, "val": 4, "test": 2} and meta["test_fraction"] == 0.1
    assert sum(meta["tokens"].values()) == sum(data.read_meta(plain)["tokens"].values())
    assert data.has_split(folder, "test") and not data.has_split(plain, "test")
    assert data.Examples(folder, "test", 16, 257).count == 2  # opens like val
    with pytest.raises(data.DataError, match="takes all 6 held-out record"):
        prepare_sft(tmp_path, records, val_fraction=0.3, test_fraction=0.29)  # round(5.8) = 6


def test_meta_files_order_and_same_bytes_on_every_run(tmp_path):
    write_records(tmp_path / "b.jsonl", [{"prompt": "b", "completion": "2"}])
    write_records(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "1"}, "",
                                         {"prompt": "c", "completion": "3"}])
    inputs = [str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")]  # read by name: a, then b
    options = {"tokenizer": "byte", "data_root": tmp_path / "data", "name": "qa",
               "val_fraction": 0.3}
    folder = prepare.prepare("sft", inputs=inputs, **options)
    first = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert prepare.prepare("sft", inputs=inputs, **options) == folder
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == first

    assert [bytes(ids[1:-1]).decode() for ids, _ in examples(folder, "train")] == ["a1", "c3"]
    # record 2 of 3
    assert [bytes(ids[1:-1]).decode() for ids, _ in examples(folder, "val")] == ["b2"]
    meta = data.read_meta(folder)
    source = (tmp_path / "a.jsonl").read_bytes() + (tmp_path / "b.jsonl").read_bytes()
    assert (meta["source_sha256"] == hashlib.sha256(source).hexdigest()
            and meta["source_bytes"] == len(source))
    assert {key: meta[key] for key in ("dataset", "tokenizer", "encoding", "vocab_size", "eot_id",
                                       "format", "shard_format", "block_size", "val_fraction",
                                       "dropped")} == {
        "dataset": "sft", "tokenizer": "byte", "encoding": None, "vocab_size": 257, "eot_id": EOT,
        "format": "sft", "shard_format": "sft npy v1", "block_size": 1024, "val_fraction": 0.3,
        "dropped": {"nothing_to_train": 0, "too_long": 0}}
    assert sorted(first) == ["meta.json", *(f"{split}_{name}.npy" for split in ("train", "val")
                                            for name in ("mask", "offsets", "tokens"))]


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "records.jsonl:2 is not a JSON object"),
    ({"prompt": "a"}, "records.jsonl:2 needs both prompt and completion"),
    ({"prompt": "a", "completion": "b", "messages": []},
     "records.jsonl:2 needs either prompt and completion or"),
    ({"text": "a"}, "records.jsonl:2 needs either prompt and completion or messages"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
     "records.jsonl:2: user content must be a string, not NoneType"),
    ('{"prompt": "\\ud800", "completion": "b"}', "records.jsonl:2: prompt holds a lone surrogate"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "records.jsonl:2: unknown role 'robot'"),
    ({"prompt": 3, "completion": "b"}, "records.jsonl:2: prompt must be a string"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    with pytest.raises(data.DataError, match=message.replace("(", r"\(")):
        prepare_sft(tmp_path, [{"prompt": "ok", "completion": "ok"}, line,
                               {"prompt": "c", "completion": "d"}])


def test_a_lone_bad_record_is_named_for_its_format_not_its_count(tmp_path):
    with pytest.raises(data.DataError, match="records.jsonl:1 needs either prompt and completion"):
        prepare_sft(tmp_path, [{"question": "hi", "answer": "yo"}])
    with pytest.raises(data.DataError, match="1 record.s. in the input; sft needs at least 2"):
        prepare_sft(tmp_path, [{"prompt": "ok", "completion": "ok"}])


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "records.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n'
                                             b'{"prompt": "\xff"}\n')
    with pytest.raises(data.DataError, match="records.jsonl:2 is not UTF-8"):
        prepare.prepare("sft", inputs=[str(tmp_path / "records.jsonl")], tokenizer="byte",
                        data_root=tmp_path)


def test_load_sft_refuses_damaged_folders(tmp_path):
    folder = prepare_sft(tmp_path, [{"prompt": "a", "completion": "b"}] * 4, name="chat")
    np.save(folder / "train_mask.npy", np.zeros(3, dtype=np.uint8))
    with pytest.raises(data.DataError, match="disagree in length"):
        data.load_sft(folder, "train")
    (folder / "val_tokens.npy").unlink()
    with pytest.raises(data.DataError,
                       match="cannot be read.*python prepare.py sft --input ... --name chat"):
        data.load_sft(folder, "val")


def test_example_records_fit_128_tokens_and_the_cli_reports(tmp_path):
    result = run_here("prepare.py", ["sft", "--input", str(ROOT / "config" / "sft_example.jsonl"),
                                     "--block_size", "128", "--data_root", str(tmp_path)])
    assert ("dropped 0 longer than block_size + 1 = 129 tokens and 0 with nothing to train"
            in result.stdout)
    meta = data.read_meta(tmp_path / "sft")
    assert meta["examples"]["val"] == 34 and meta["tokenizer"] == "gpt2"
    assert meta["leakage"]["val_in_train"] == 0  # no val record repeats a train one
    bad = run_here("prepare.py", ["sft", "--input",
                                  str(write_records(tmp_path / "one.jsonl", ["{"])),
                                  "--data_root", str(tmp_path)], check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and bad.stderr.count("\n") == 1
    assert (tmp_path / "sft" / "meta.json").exists()  # the earlier dataset is untouched
    wrong = run_here("prepare.py", ["text", "--input", "README.md", "--block_size", "64"],
                     check=False)
    assert wrong.returncode == 2 and "--block_size is for sft only" in wrong.stderr
