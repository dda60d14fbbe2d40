"""A BPE tokenizer trained on the data (issue 26, point 1): `prepare.py --tokenizer=bpe
--vocab_size=N` learns it from the train split alone with Hugging Face tokenizers, saves it beside
the shards as tokenizer.json (named in meta.json with its sha256), and every script rebuilds it from
the meta, a checkpoint's copy included; export.py hands it to transformers. The text is the
repository's play (tests/fixtures/play.txt)."""

import hashlib
import json
import shutil

import pytest
import torch
from conftest import PLAY, prepare_cli, run_here, tiny_args

import data
import prepare
from checkpoint import load_checkpoint
from model import GPT, GPTConfig

VOCAB = 512
WORD = " Zyzzogeton"  # in no text of the repository but these tests'
MANY_WORDS = WORD * 300  # 3,300 bytes: under the play's last 10%, so wholly in val when appended


def prepare_bpe(data_root, name="mine", inputs=(PLAY,), vocab_size=VOCAB, dataset="text"):
    folder = prepare.prepare(dataset, inputs=[str(path) for path in inputs], tokenizer="bpe",
                             vocab_size=vocab_size, data_root=data_root, name=name)
    return folder, data.read_meta(folder)


def text_file(tmp_path, name, text):
    path = tmp_path / "inputs" / name / "text.txt"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_meta_names_the_tokenizer_file_and_read_meta_brings_its_text(tmp_path):
    folder, meta = prepare_bpe(tmp_path / "data")
    on_disk = json.loads((folder / "meta.json").read_text())
    tokenizer_bytes = (folder / "tokenizer.json").read_bytes()
    assert (on_disk["tokenizer"], on_disk["tokenizer_file"], on_disk["vocab_size"],
            on_disk["eot_id"]) == ("bpe", "tokenizer.json", VOCAB, 0)
    assert on_disk["tokenizer_sha256"] == hashlib.sha256(tokenizer_bytes).hexdigest()
    assert "tokenizer_json" not in on_disk  # meta.json stays small
    assert meta == {**on_disk, "tokenizer_json": tokenizer_bytes.decode()}
    tokenizer = data.get_tokenizer(meta)
    assert isinstance(tokenizer, data.BPETokenizer) and tokenizer.vocab_size == VOCAB
    assert tokenizer.backend.id_to_token(0) == data.EOT_TEXT


def test_tokens_decode_to_the_text_and_a_literal_end_of_text_stays_text(tmp_path):
    _, meta = prepare_bpe(tmp_path / "data")
    tokenizer = data.get_tokenizer(meta)
    shard = data.load_shard(tmp_path / "data" / "mine" / "train_000000.bin")
    assert PLAY.read_text().startswith(tokenizer.decode(shard))  # train is the play's beginning
    text = f"ROMEO: café {data.EOT_TEXT} 🎉\n"
    ids = tokenizer.encode(text)
    assert tokenizer.eot_id not in ids and tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.eot_id, *ids]) == text  # decode leaves out end-of-text


def test_the_tokenizer_learns_from_train_only(tmp_path):
    """The same word repeated: at the end of the text (val) it is no token of its own; at the start
    (train) it is."""
    in_val = text_file(tmp_path, "val", PLAY.read_text() + MANY_WORDS)
    in_train = text_file(tmp_path, "train", MANY_WORDS + PLAY.read_text())
    _, meta = prepare_bpe(tmp_path / "data", "in_val", [in_val])
    assert len(data.get_tokenizer(meta).encode(WORD)) > 1
    assert not any("zzog" in token
                   for token in json.loads(meta["tokenizer_json"])["model"]["vocab"])
    _, control = prepare_bpe(tmp_path / "data", "in_train", [in_train])
    assert len(data.get_tokenizer(control).encode(WORD)) == 1
    assert "tokenizer_sha256" in data.data_differences(meta, control)  # checkpoints tell them apart


@pytest.mark.parametrize("record, split", [(19, "val"), (18, "train")])
def test_sft_learns_from_the_train_records_only(tmp_path, record, split):
    """Of 20 records, 9 and 19 are val (prepare.py's rule); the word fills a record's completion."""
    records = tmp_path / "inputs" / "records.jsonl"
    records.parent.mkdir()
    paragraphs = PLAY.read_text().split("\n\n")
    completions = [WORD * 60 if i == record else paragraphs[i] for i in range(20)]
    records.write_text("".join(json.dumps({"messages": [
                                   {"role": "user", "content": paragraphs[i + 20]},
                                   {"role": "assistant", "content": completions[i]}]}) + "\n"
                               for i in range(20)))
    folder, meta = prepare_bpe(tmp_path / "data", "chat", [records], dataset="sft")
    tokenizer = data.get_tokenizer(meta)
    assert ((meta["format"], meta["tokenizer"], meta["examples"])
            == ("sft", "bpe", {"train": 18, "val": 2}))
    assert (len(tokenizer.encode(WORD)) == 1) == (split == "train")
    tokens, _, offsets = data.load_sft(folder, "val")
    last = tokens[offsets[1]:offsets[2]]
    assert last[0] == last[-1] == tokenizer.eot_id
    assert tokenizer.decode(last) == f"User: {paragraphs[39]}\n\nAssistant: {completions[19]}"


def test_preparing_twice_gives_the_same_files(tmp_path):
    first, _ = prepare_bpe(tmp_path / "data", "first")
    run_here("prepare.py", ["text", "--input", str(PLAY), "--tokenizer=bpe",
                            f"--vocab_size={VOCAB}", "--name", "second", "--data_root",
                            str(tmp_path / "data")])  # another process
    second = tmp_path / "data" / "second"
    names = sorted(path.name for path in first.iterdir())
    assert names == ["meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]
    assert names == sorted(path.name for path in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("arguments, message", [
    (["--tokenizer=bpe", "--vocab_size=256"],
     "--vocab_size 256 is too small for what a bpe vocabulary holds before any merge: the 256 "
     "byte symbols and the special tokens (<|endoftext|>); pass at least 257"),
    (["--tokenizer=bpe"], "--tokenizer bpe learns a vocabulary of --vocab_size ids; pass one"),
    (["--tokenizer=byte", "--vocab_size=300"],
     "--vocab_size is the size of the vocabulary that --tokenizer bpe learns; byte has its own"),
])
def test_bad_vocabulary_options_are_one_line_and_write_nothing(tmp_path, capsys, arguments,
                                                                message):
    status, _, err = prepare_cli(capsys, "text", "--input", PLAY, *arguments, "--data_root",
                                 tmp_path / "data")
    assert status == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_web_data_and_meta_refuse_bpe(tmp_path, capsys):
    for arguments in (["fineweb10B", "--input", PLAY, "--vocab_size=300"],
                      ["fineweb10B", "--input", PLAY],  # refused as web data, not for --vocab_size
                      ["meta", "--name", "shards", "--vocab_size=300"]):
        status, _, err = prepare_cli(capsys, *arguments, "--tokenizer=bpe",
                                     "--data_root", tmp_path / "data")
        assert status == 2 and "the bpe tokenizer learns its vocabulary from the train split" in err
        assert err.count("\n") == 1 and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_a_changed_tokenizer_file_is_refused(tmp_path):
    folder, _ = prepare_bpe(tmp_path / "data")
    with open(folder / "tokenizer.json", "a") as f:
        f.write(" ")
    result = run_here("train.py", tiny_args(tmp_path / "data", tmp_path / "out", dataset="mine"),
                      check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {folder / 'tokenizer.json'} does not match "
                                    "meta.json's tokenizer_sha256")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_sample_eval_and_export_to_transformers(tmp_path, monkeypatch):
    """The data folder is gone after training: sample.py and eval.py rebuild the tokenizer from the
    checkpoint."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_root, out, hf = tmp_path / "data", tmp_path / "out", tmp_path / "hf"
    folder, meta = prepare_bpe(data_root)
    run_here("train.py", tiny_args(data_root, out, dataset="mine", max_iters=20, lr_decay_iters=20))
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["meta"]["tokenizer_json"] == meta["tokenizer_json"]
    shutil.rmtree(folder)
    sampled = run_here("sample.py", [f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1",
                                     "--max_new_tokens=8", "--device=cpu"])
    assert sampled.stdout.startswith("ROMEO:") and sampled.stdout.endswith("---------------\n")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"ctx": "ROMEO: Good", "endings": ["morrow.", "night."],
                                        "label": i}) + "\n"
                            for i in range(2)))
    scored = run_here("eval.py", [f"--out_dir={out}", f"--task={task}", "--device=cpu"])
    assert f"{task}: acc 0.5000" in scored.stdout
    exported = run_here("export.py", [str(out / "best.pt"), str(hf)])
    assert f"AutoTokenizer.from_pretrained({str(hf)!r})" in exported.stdout
    assert (hf / "tokenizer.json").read_text() == meta["tokenizer_json"]
    text = "ROMEO: Wherefore, café 🎉?\n\n  Good morrow"
    ours = data.get_tokenizer(data.read_meta(hf))  # the exported meta.json names its tokenizer.json
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    assert theirs(text)["input_ids"] == ours.encode(text) and theirs.eos_token_id == ours.eot_id
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    ids = torch.tensor([ours.encode(text)])
    with torch.no_grad():
        ours_logits, _ = model.eval()(ids)
        hf_logits = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-4
    from_folder = run_here("sample.py", [f"--init_from={hf}", "--num_samples=1",
                                         "--max_new_tokens=8", "--device=cpu"])
    assert from_folder.stdout.endswith("---------------\n")
