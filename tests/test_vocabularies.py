"""Tokenizers beyond GPT-2's (issue 26): any tiktoken encoding by name, and uint32 shards for a
vocabulary of more than 65,536 ids. The only encoding file here is r50k_base's (TIKTOKEN_CACHE_DIR),
so the big vocabulary is a tiktoken_ext plugin of our own, tiktoken's way to name an encoding: every
id of it needs uint32."""

import hashlib
import json
import mmap
import os
import runpy

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch
from conftest import PLAY, prepare_cli, read_log, run_here, tiny_args

import data
import prepare
from data import DataError

BIG = "bytes_above_uint16"
PLUGIN = f'''\
"""Every byte b as id 65,536 + b, end-of-text as 65,792: ids 0..65,535 are left unassigned."""
ENCODING_CONSTRUCTORS = {{"{BIG}": lambda: {{
    "name": "{BIG}",
    "pat_str": r"\\S+|\\s+",
    "mergeable_ranks": {{bytes([b]): 2**16 + b for b in range(256)}},
    "special_tokens": {{"<|endoftext|>": 2**16 + 256}},
}}}}
'''
BIG_VOCAB, BIG_EOT = 2**16 + 257, 2**16 + 256


@pytest.fixture
def big_vocab(tmp_path, monkeypatch):
    """The plugin, known by name to this process and, through PYTHONPATH, to the scripts it runs."""
    plugin = tmp_path / "plugin" / "tiktoken_ext" / f"{BIG}.py"
    plugin.parent.mkdir(parents=True)
    plugin.write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(plugin.parent.parent), prepend=os.pathsep)
    tiktoken.list_encoding_names()  # finds the installed plugins' encodings (once a process)
    constructors = {**tiktoken.registry.ENCODING_CONSTRUCTORS,
                    **runpy.run_path(str(plugin))["ENCODING_CONSTRUCTORS"]}
    monkeypatch.setattr(tiktoken.registry, "ENCODING_CONSTRUCTORS", constructors)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", dict(tiktoken.registry.ENCODINGS))


@pytest.fixture
def big_data(tmp_path, big_vocab, capsys):
    """The play prepared with the big vocabulary, by name on the command line."""
    status, _, err = prepare_cli(capsys, "text", "--input", PLAY, f"--tokenizer={BIG}", "--name",
                                 "big", "--data_root", tmp_path / "data")
    assert status == 0, err
    return tmp_path / "data" / "big"


def test_ids_over_uint16_make_uint32_shards_that_windows_memmaps(big_data):
    meta = data.read_meta(big_data)
    assert ((meta["tokenizer"], meta["encoding"], meta["vocab_size"], meta["eot_id"])
            == (BIG, BIG, BIG_VOCAB, BIG_EOT))
    assert meta["shard_format"] == "llm.c v7 uint32"
    train_path, val_path = (data.shard_paths(big_data, split)[0] for split in ("train", "val"))
    count = meta["tokens"]["train"]
    # llm.c's Llama 3 header
    assert np.fromfile(train_path, dtype="<i4", count=3).tolist() == [20240801, 7, count]
    assert train_path.stat().st_size == data.HEADER_BYTES + 4 * count
    train, val = data.load_shard(train_path), data.load_shard(val_path)
    assert train.dtype == np.uint32 and not train.flags.writeable
    source = np.frombuffer(PLAY.read_bytes(), dtype=np.uint8)
    # every id above uint16's range, none wrapped
    np.testing.assert_array_equal(train - 2**16, source[:count])
    assert val[-1] == BIG_EOT and (val[:-1] - 2**16 == source[count:]).all()

    windows = data.Windows(big_data, "train", 32, BIG_VOCAB)
    try:
        assert windows.dtypes == (np.dtype("<u4"),)
        mapped = data.map_tokens(windows.files[0], windows.lengths[0], windows.dtypes[0])
        # the file itself, not a copy
        assert isinstance(mapped, np.memmap) and isinstance(mapped.base, mmap.mmap)
        x, y = windows.batch([0, 1000])
        assert torch.equal(x[1], torch.from_numpy(train[1000:1032].astype(np.int64)))
        assert torch.equal(y[1], torch.from_numpy(train[1001:1033].astype(np.int64)))
    finally:
        windows.close()


def test_ids_over_uint16_keep_the_audit_and_identity(big_data, tmp_path):
    big = data.read_meta(big_data)
    byte = data.read_meta(prepare.prepare("text", inputs=[str(PLAY)], data_root=tmp_path / "data",
                                          name="byte"))
    # a byte each, either way
    assert big["leakage"] == byte["leakage"] and big["tokens"] == byte["tokens"]
    assert data.data_differences(big, big) == []
    assert data.data_differences(byte, big) == ["tokenizer", "encoding", "vocab_size"]
    assert f"{BIG} tokens, vocab {BIG_VOCAB}" in data.describe_data(big)


def test_decode_drops_ids_an_encoding_leaves_unassigned(big_vocab):
    tokenizer = data.get_tokenizer({"tokenizer": BIG})
    assert tokenizer.dtype == np.uint32 and tokenizer.eot_id == BIG_EOT
    assert tokenizer.decode([5, 2**16 + ord("h"), 65_000, 2**16 + ord("i"), BIG_EOT,
                             BIG_VOCAB]) == "hi"


def test_sft_records_with_ids_over_uint16(big_vocab, tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"prompt": "Q: ", "completion": "same"}) + "\n"
                               for _ in range(10)))
    folder = prepare.prepare("sft", inputs=[str(records)], tokenizer=BIG,
                             data_root=tmp_path / "data")
    meta = data.read_meta(folder)
    assert meta["leakage"]["val_in_train"] == 1  # the audit hashes uint32 ids alike
    tokens, _, _ = data.load_sft(folder, "train")
    assert tokens.dtype == np.uint32 and tokens.min() >= 2**16
    x, y = data.Examples(folder, "train", 16, BIG_VOCAB).rows([0], packed=False)
    assert (x[0, 0] == BIG_EOT
            and y[0, 3:8].tolist() == [2**16 + ord(c) for c in "same"] + [BIG_EOT])


@pytest.mark.slow
def test_a_uint32_dataset_trains_and_resumes(big_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(big_data.parent, out, dataset="big", n_embd=16, block_size=16, batch_size=4,
                     max_iters=6, lr_decay_iters=6, warmup_iters=1, eval_interval=3, eval_iters=1,
                     log_interval=1, ckpt_interval=3, sample_interval=3,
                     sample_tokens=8)  # samples decode whatever ids the model draws
    run_here("train.py", [*args, "--stop_iter=3"])
    run_here("train.py", [*args, "--init_from=resume"])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 6
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] == 3
    log = read_log(out)
    assert all(np.isfinite(record["val_loss"]) for record in log if "val_loss" in record)
    assert any("sample" in record for record in log)


def test_uint16_shards_are_byte_identical_to_before(tmp_path):
    """sha256 of every file prepare wrote before uint32 shards existed (commit 7f0aa91), meta.json
    included."""
    root = tmp_path / "data"
    for tokenizer, expected in UINT16_FILES.items():
        folder = prepare.prepare("text", inputs=[str(PLAY)], tokenizer=tokenizer, data_root=root,
                                 name=tokenizer, shard_tokens=20_000, test_fraction=0.05)
        assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in folder.iterdir()} == expected
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i}"})
                               + "\n" for i in range(10)))
    folder = prepare.prepare("sft", inputs=[str(records)], data_root=root)
    assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in folder.iterdir()} == UINT16_SFT

    tokens = np.array([0, 1, 50256, 65535], dtype=np.uint16)
    data.write_shard(tmp_path / "x.bin", tokens)  # llm.c's layout, built here by hand
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, 4
    assert (tmp_path / "x.bin").read_bytes() == header.tobytes() + tokens.astype("<u2").tobytes()


UINT16_FILES = {
    "gpt2": {
        "meta.json": "4ce17bc27540fa81f4b31f60e7f6a94cd90eedbbe80ad49636d592d95de9f744",
        "train_000000.bin": "85f42d1069db7c9ed5d277a85964ed75d130304698b234db5c80d8127fc7bbe1",
        "val_000000.bin": "c8ebbacc10f1046e5a94f8f01adeab6d555e1639c3aa29cb04c94c44a55e812e",
        "test_000000.bin": "59ba8b3607b00c86b73e865e5cd16e61f57a6d31d8e50235f6e1b006e40a1d75",
    },
    "byte": {
        "meta.json": "7f7ae63003aef1c51784e9a90f46697e9095ae3cde809b95d8dab9ac2dab288c",
        "train_000000.bin": "fca8db26853e07ff2c1e86857ec60a0eba02555d3a2cfbd56daf2ceb214cd753",
        "train_000001.bin": "41100d4b55f9072637f0b263bcdd5051299188c318476ab575f3df5bca4e7be6",
        "train_000002.bin": "722c4435f6de8c7d9a121836515c4dfd8e9d38dd436be9cdc127c40f12a1677c",
        "val_000000.bin": "94f17de888ec09c61f11dbe525d6241141f5c97360d3576e3812a5371c7ccb6d",
        "test_000000.bin": "28760a64b33477fb811d5756dfda35c028b3e1ae17e5ab07a2663fac4d46752d",
    },
}
UINT16_SFT = {
    "meta.json": "9a0800c9f3ad0b58ccc6e1162d6d6da81e76e47d6ac04e0e92d4bc9ea288d181",
    "train_tokens.npy": "9dd26b58360931ef90a2ba33b5d8bfea76fe48a197fbe993615e844c470ec1aa",
    "train_mask.npy": "e66dabd397fc978f4e5c989c4ff801a5954fad5847aa0e146384d549a2e648ab",
    "train_offsets.npy": "b0930adca5c691412f9547b9cf564ccaced638305b893d598287bae792145097",
    "val_tokens.npy": "14f42e5aa6d8b2688804d4f31f8eb70a6cca2e8caf4bd5c184901f6d8b03a632",
    "val_mask.npy": "e87a5bc5efc50897612025ae96372f7ca1651557aafeaba97ca7bc8215496218",
    "val_offsets.npy": "11ed568253059d32580199f1d06182c97c3fa5660811e46c79c3621e3a2b18f4",
}


def test_uint32_shard_round_trip_and_damage(tmp_path):
    path = tmp_path / "train_000000.bin"
    tokens = np.arange(2**16 - 3, 2**16 + 7, dtype=np.uint32)
    data.write_shard(path, tokens)
    assert path.stat().st_size == data.HEADER_BYTES + 4 * 10
    np.testing.assert_array_equal(data.load_shard(path), tokens)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.load_shard(path)
    data.write_shard(path, tokens)
    # uint16's version
    path.write_bytes(np.array([20240801, 1], dtype="<i4").tobytes() + path.read_bytes()[8:])
    with pytest.raises(DataError, match="version 1, but only 7 is supported"):
        data.load_shard(path)
    with pytest.raises(ValueError, match="uint32 array"):
        data.write_shard(path, np.array([1, 2**16]))  # wider ids must come as uint32, not guessed


def test_r50k_base_by_name_is_gpt2(tmp_path):
    folders = {name: prepare.prepare("text", inputs=[str(PLAY)], tokenizer=name, data_root=tmp_path,
                                     name=name)
               for name in ("gpt2", "r50k_base")}
    metas = {name: data.read_meta(folder) for name, folder in folders.items()}
    for split in ("train", "val"):
        gpt2, r50k = (data.shard_paths(folder, split)[0].read_bytes()
                      for folder in folders.values())
        assert gpt2 == r50k
    assert {key: value for key, value in metas["r50k_base"].items() if key != "tokenizer"} == {
        key: value for key, value in metas["gpt2"].items() if key != "tokenizer"}
    assert metas["r50k_base"]["encoding"] == "r50k_base" and metas["r50k_base"]["eot_id"] == 50256
    assert data.is_gpt2_bpe(metas["r50k_base"])


@pytest.mark.parametrize("case", ["unknown", "not cached, offline"])
def test_an_encoding_it_cannot_load_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                                    case):
    name = "o200k_base" if case == "not cached, offline" else "o201k_base"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # none loaded yet: cache is consulted

    def offline(url):
        raise OSError(f"cannot reach {url}: network is unreachable")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    status, out, err = prepare_cli(capsys, "text", "--input", PLAY, f"--tokenizer={name}", "--name",
                                   "mine", "--data_root", tmp_path / "data")
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ")
    if case == "unknown":
        assert f"unknown tokenizer '{name}'" in err and "cl100k_base" in err
    else:
        assert "o200k_base.tiktoken" in out  # the download it tried, announced
        assert f"'{name}' is not in tiktoken's cache and could not be downloaded" in err
        assert "network is unreachable" in err and "TIKTOKEN_CACHE_DIR" in err
    assert not (tmp_path / "data").exists()
