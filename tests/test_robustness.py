"""Issue 17's findings, each reproduced as it was found: every one now ends in a correct run or in
one line `error: ...` with a non-zero exit status, and leaves what was already on disk as it was.
Then the acceptance runs: a torn log resumed and plotted, what a resume changed (applied and
recorded), two runs started on one folder, and a write over the file size limit."""

import fractions
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PLAY, ROOT, read_log, tiny_args

import checks
import compare
import eval
import export
import plot
import prepare
import sample
import train
from configurator import ConfigError, load_config
from devices import RuntimeConfig
from model import GPTConfig, architecture_options

SHORT = {"max_iters": 20, "lr_decay_iters": 20, "eval_interval": 10, "ckpt_interval": 10,
         "sample_interval": 10}


def short_args(data_root, out_dir, **overrides):
    return tiny_args(data_root, out_dir, **{**SHORT, **overrides})


@pytest.fixture(scope="module")
def paused_run(data_root, tmp_path_factory):
    """A tiny run paused at step 10 of 20 (last.pt, best.pt there), for tests to copy and resume."""
    out = tmp_path_factory.mktemp("paused") / "run"
    train.main(short_args(data_root, out, stop_iter=10))
    return out


def copy_of(run, tmp_path):
    """A copy of a run folder; its checkpoint's config still names the original out_dir."""
    return shutil.copytree(run, tmp_path / "run")


def on_disk(folder):
    """Every file under folder, with its bytes and mtime: what a refused command must not change."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else None


def refused(main, args, capsys, code=2):
    """Run a script's main in-process: it must exit `code` after one line `error: ...` on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def one_line(result, code):
    """A finished subprocess's single stderr line, `error: ...`, after exit status `code`."""
    lines = result.stderr.splitlines()
    assert (result.returncode == code and len(lines) == 1
            and lines[0].startswith("error: ")), result.stderr
    return lines[0]


def run_record(out_dir):
    return json.loads((out_dir / "run.json").read_text())


# ---- the classification of config keys on resume ----

def test_the_model_and_the_optimizer_are_fixed_on_resume():
    classes = {key: declared.resume for key, declared in train.declared().items()}
    fixed = {key for key, resume in classes.items() if resume == "fixed"}
    assert fixed == {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias",
                     *architecture_options(),
                     "lora_rank", "lora_alpha", "lora_targets", "optimizer"}
    assert {key for key, resume in classes.items() if resume == "val batches"} == {
        "batch_size", "eval_iters", "val_tokens"}


def test_a_key_no_class_declares_is_fixed_on_resume():
    """A new key is safe until declared: a resume changing the checkpoint's value is refused."""
    cfg = load_config(train.__file__, [], RuntimeConfig, GPTConfig)
    cfg.new_key = 2
    ckpt = {"path": "out/last.pt", "config": {**vars(cfg), "new_key": 1}}
    with pytest.raises(ConfigError,
                       match="was trained with new_key=1, which a resume cannot change"):
        checks.resume_changes(cfg, ckpt, train.declared())
    cfg.new_key = 1
    assert checks.resume_changes(cfg, ckpt, train.declared()) == {}


# ---- 1. a torn last line of log.jsonl (acceptance 2) ----

def test_a_resumed_run_whose_log_ended_in_a_torn_line_finishes_and_plots(data_root, paused_run,
                                                                         tmp_path, capsys):
    out = copy_of(paused_run, tmp_path)
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": 696, "tokens": 178176')  # what a full disk left
    train.main(short_args(data_root, out, init_from="resume"))
    assert "ended in a torn line" in capsys.readouterr().out
    assert (out / "log.jsonl.torn").read_bytes() == b'{"step": 696, "tokens": 178176\n'
    assert (max(r["step"] for r in read_log(out)) == 20
            and run_record(out)["end_reason"] == "finished")
    plot.main([str(out / "log.jsonl"), "-o", str(tmp_path / "drawn.png")])
    assert (tmp_path / "drawn.png").read_bytes()[:4] == b"\x89PNG"


# ---- 2. changed settings on resume: applied, refused or listed, and recorded (acceptance 3) ----

def test_optimizer_settings_changed_on_resume_take_effect_and_are_recorded(data_root, paused_run,
                                                                           tmp_path, capsys):
    out = copy_of(paused_run, tmp_path)
    train.main(short_args(data_root, out, init_from="resume", beta2=0.95, weight_decay=0.2,
                          embedding_lr=3e-3))
    said = capsys.readouterr().out
    assert "beta2 0.99 -> 0.95 (set in the optimizer)" in said and "weight_decay 0.1 -> 0.2" in said
    changed = run_record(out)["changed_on_resume"]
    assert changed["beta2"] == [0.99, 0.95] and changed["weight_decay"] == [0.1, 0.2]
    assert changed["embedding_lr"] == [0.0, 3e-3]
    assert changed["stop_iter"] == [10, 0] and changed["out_dir"] == [str(paused_run), str(out)]
    groups = torch.load(out / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.9, 0.95)] * 3
    # embeddings and matrices decay, 1-D weights never; 3.0 = embedding_lr / learning_rate
    assert [g["weight_decay"] for g in groups] == [0.2, 0.2, 0.0]
    assert [g["lr_scale"] for g in groups] == [pytest.approx(3.0), 1.0, 1.0]
    resumed = [r for r in read_log(out) if r.get("event") == "resumed"]
    assert resumed[0]["changed"] == changed


def test_muon_settings_on_resume_are_the_configured_ones(data_root, tmp_path):
    out = tmp_path / "run"
    train.main(short_args(data_root, out, optimizer="muon", muon_split="head", stop_iter=10))
    train.main(short_args(data_root, out, optimizer="muon", init_from="resume", learning_rate=2e-3,
                          min_lr=2e-4, muon_lr=0.03, muon_split="whole"))
    groups = torch.load(out / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    muon = [g for g in groups if g["muon"]]
    assert (len(muon) == 1
            and muon[0]["lr_scale"] == pytest.approx(0.03 / 2e-3))  # not 0.02 / 1e-3 as saved
    assert muon[0]["block"] == 0  # whole matrices, not the saved strips one head (16) wide
    assert set(run_record(out)["changed_on_resume"]) == {"learning_rate", "min_lr", "muon_lr",
                                                         "muon_split", "stop_iter"}


def test_a_muon_checkpoint_older_than_muon_split_resumes_as_a_said_change_from_whole(
        data_root, tmp_path):
    out = tmp_path / "run"
    train.main(short_args(data_root, out, optimizer="muon", muon_split="whole", stop_iter=10))
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    del checkpoint["config"]["muon_split"]  # as saved before the key, by a Muon of whole matrices
    for group in checkpoint["optimizer"]["param_groups"]:
        del group["block"]
    torch.save(checkpoint, out / "last.pt")
    train.main(short_args(data_root, out, optimizer="muon", muon_split="head", init_from="resume"))
    assert run_record(out)["changed_on_resume"]["muon_split"] == ["whole", "head"]
    groups = torch.load(out / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["block"] for g in groups if g["muon"]] == [16]


def test_muon_settings_are_not_changes_for_an_adamw_run(data_root, paused_run, tmp_path):
    out = copy_of(paused_run, tmp_path)
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    del checkpoint["config"]["muon_split"]  # older than the key: BEFORE_THE_KEY reads it as whole
    torch.save(checkpoint, out / "last.pt")
    train.main(short_args(data_root, out, init_from="resume", muon_split="head", muon_lr=0.05))
    assert not {"muon_split", "muon_lr"} & set(run_record(out)["changed_on_resume"])


def test_new_eval_batches_are_refused_unless_allowed_and_other_changes_are_listed(
        data_root, paused_run, tmp_path, capsys):
    out = copy_of(paused_run, tmp_path)
    before = on_disk(out)
    for key, value in (("batch_size", 4), ("eval_iters", 2)):
        err = refused(train.main, short_args(data_root, out, init_from="resume", **{key: value}),
                      capsys)
        assert (f"{key} " in err and "best.pt's selection would compare" in err
                and "--allow_new_eval_batches" in err)
    assert on_disk(out) == before
    changes = {"batch_size": 4, "seed": 7, "dropout": 0.0, "gradient_accumulation_steps": 2,
               "max_iters": 30, "lr_decay_iters": 30, "grad_clip": 0.5}
    train.main(short_args(data_root, out, init_from="resume", allow_new_eval_batches=True,
                          **changes))
    assert "batch_size 8 -> 4 (new val batches)" in capsys.readouterr().out
    recorded = run_record(out)["changed_on_resume"]
    assert {key: new for key, (_, new) in recorded.items() if key in changes} == changes
    assert "allow_new_eval_batches" not in recorded and "init_from" not in recorded
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 30


@pytest.mark.parametrize(("changes", "named"), [
    ({"n_layer": 3, "n_embd": 64}, "n_layer=2, n_embd=32"),
    ({"optimizer": "muon"}, "optimizer=adamw"),
    ({"pos_embedding": "rope"}, "pos_embedding=learned"),
])
def test_a_change_the_checkpoint_cannot_follow_is_refused_naming_both_values(
        data_root, paused_run, tmp_path, capsys, changes, named):
    out = copy_of(paused_run, tmp_path)
    before = on_disk(out)
    err = refused(train.main, short_args(data_root, out, init_from="resume", **changes), capsys)
    asked = ", ".join(f"{key}={value}" for key, value in changes.items())
    assert f"was trained with {named}" in err and f"asks for {asked}" in err
    assert on_disk(out) == before


def test_a_checkpoint_older_than_an_option_counts_as_without_it(data_root, paused_run, tmp_path,
                                                                capsys):
    out = copy_of(paused_run, tmp_path)
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    for key in ("value_embeddings", "val_tokens"):
        del checkpoint["config"][key]
    torch.save(checkpoint, out / "last.pt")
    err = refused(train.main, short_args(data_root, out, init_from="resume", value_embeddings=1),
                  capsys)
    assert "was trained with value_embeddings=0" in err
    err = refused(train.main, short_args(data_root, out, init_from="resume", val_tokens=8 * 32),
                  capsys)
    assert "val_tokens 0 -> 256 would change the fixed val batches" in err


# ---- 3. changed data ----

def prepared_elsewhere(tmp_path, name, text):
    root = tmp_path / "data"
    source = tmp_path / f"{name}.txt"
    source.write_text(text)
    prepare.prepare("shakespeare_char", inputs=[str(source)], data_root=root, name=name)
    return root


def test_other_data_is_refused_on_resume(data_root, paused_run, tmp_path, capsys):
    out = copy_of(paused_run, tmp_path)
    before = on_disk(out)
    # the same play, one character exchanged for another: same vocab size, another id for it
    root = prepared_elsewhere(tmp_path, "shakespeare_char", PLAY.read_text().replace("&", "+"))
    saved = json.loads((data_root / "shakespeare_char" / "meta.json").read_text())["source_sha256"]
    now = json.loads((root / "shakespeare_char" / "meta.json").read_text())["source_sha256"]
    err = refused(train.main, short_args(root, out, init_from="resume"), capsys)
    assert saved[:12] in err and now[:12] in err and "differ in chars, source_sha256" in err
    prepared_elsewhere(tmp_path, "other", PLAY.read_text()[:30000])
    err = refused(train.main, short_args(root, out, init_from="resume", dataset="other"), capsys)
    assert f"but {root / 'other'} holds" in err and "differ in source_sha256, tokens" in err
    assert on_disk(out) == before


# ---- 4. two runs in one folder (acceptance 4) ----

@pytest.mark.slow
def test_two_runs_started_together_on_one_folder_one_trains_the_other_names_its_owner(
        data_root, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train.py", *short_args(data_root, out, max_iters=150,
                                                       lr_decay_iters=150, eval_interval=50,
                                                       ckpt_interval=50, sample_interval=0)]
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 2], errors
    winner, loser = sorted(range(2), key=lambda i: runs[i].returncode)
    lines = errors[loser].splitlines()
    assert (len(lines) == 1 and lines[0].startswith("error: ")
            and f"in use by another run (pid {runs[winner].pid}" in lines[0]), errors[loser]
    steps = [r["step"] for r in read_log(out) if "lr" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # each step logged once, by one run
    assert not (out / ".lock").exists()


def test_a_fresh_run_refuses_a_folder_holding_an_old_runs_log_and_checkpoint(data_root, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0, "tokens": 0, "train_loss": 4.2, "val_loss": 4.2}\n')
    (out / "best.pt").write_bytes(b"weights")  # a checkpoint, if only best.pt: not to train over
    before = on_disk(out)
    assert "already holds a run's log.jsonl" in refused(
        train.main, short_args(data_root, out), capsys)
    assert on_disk(out) == before


# ---- 5. write failures (acceptance 5) ----

@pytest.mark.slow
def test_a_file_size_limit_ends_the_run_in_one_line_keeping_the_last_checkpoint(
        data_root, paused_run, tmp_path):
    out = copy_of(paused_run, tmp_path)
    limit_kb = 200  # above best.pt (~130 KB) and the records, below last.pt (~370 KB)
    assert (out / "best.pt").stat().st_size < limit_kb * 1024 < (out / "last.pt").stat().st_size
    command = shlex.join([sys.executable, "train.py",
                          *short_args(data_root, out, init_from="resume")])
    result = subprocess.run(["bash", "-c", f"ulimit -f {limit_kb}; exec {command}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    line = one_line(result, 1)
    assert (f"cannot write {out / 'last.pt'} (File too large; " in line
            and "GB free on its disk" in line)
    assert "run.json records why" in line and "resume with --init_from=resume" in line
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 10  # the previous one, whole
    record = run_record(out)
    assert record["end_reason"].startswith(
        f"write failed: cannot write {out / 'last.pt'} (File too large")


def test_a_disk_filling_up_mid_save_says_when_run_json_cannot_record_it(
        data_root, paused_run, tmp_path, capsys, monkeypatch):
    out = copy_of(paused_run, tmp_path)
    full, save = [], torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if hasattr(f, "write") and "last.pt" in f.name:
            f.write(b"partial")
            full.append(True)
            raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    write_json = train.runlog.write_json_atomic

    def write_json_unless_full(path, data):
        if full:
            raise train.runlog.write_failed(path, OSError(28, "No space left on device"))
        write_json(path, data)

    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(train.runlog, "write_json_atomic", write_json_unless_full)
    err = refused(train.main, short_args(data_root, out, init_from="resume"), capsys, code=1)
    assert "No space left on device" in err and "run.json could not be written either" in err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert run_record(out)["end_reason"] == "running"  # as the line says
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 10


# ---- 6. an unusable tokenizer, found before anything is written ----

def copied_dataset(data_root, tmp_path, **meta_changes):
    root = tmp_path / "data"
    shutil.copytree(data_root / "shakespeare_char", root / "shakespeare_char")
    meta_path = root / "shakespeare_char" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **meta_changes}))
    return root


def test_a_meta_naming_an_unknown_tokenizer_is_refused_at_start(data_root, tmp_path, capsys):
    root = copied_dataset(data_root, tmp_path, tokenizer="bpe_of_my_own")
    err = refused(train.main, short_args(root, tmp_path / "run"), capsys)
    assert "unknown tokenizer 'bpe_of_my_own'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gpt2_tokens_offline_without_a_tiktoken_cache_are_refused_at_start(tmp_path):
    root = tmp_path / "data"
    prepare.prepare("text", inputs=[str(PLAY)], data_root=root, name="play_gpt2", tokenizer="gpt2")
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    (tmp_path / "empty_cache").mkdir()
    command = [sys.executable, "train.py", *short_args(root, tmp_path / "run", dataset="play_gpt2")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **offline})
    assert ("tiktoken encoding 'r50k_base' is not in tiktoken's cache and could not be downloaded"
            in one_line(result, 2))
    assert not (tmp_path / "run").exists()


# ---- 7. tracebacks that are now one line ----

def nanogpt_checkpoint(path):
    """A nanoGPT checkpoint: model, optimizer, model_args, iter_num, best_val_loss, config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "model": {"transformer.wte.weight": torch.zeros(65, 32)}, "optimizer": {"state": {}},
        "model_args": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 65},
        "iter_num": 100, "best_val_loss": torch.tensor(2.0), "config": {"batch_size": 8}}, path)
    return path


def test_a_nanogpt_checkpoint_is_refused_by_train_sample_and_export(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    nanogpt_checkpoint(out / "last.pt")
    shutil.copy(out / "last.pt", out / "best.pt")
    before = on_disk(out)
    for main, args in ((train.main, short_args(data_root, out, init_from="resume")),
                       (sample.main, [f"--out_dir={out}", "--device=cpu"]),
                       (export.main, [str(out / "best.pt"), str(tmp_path / "hf")])):
        assert "not a checkpoint of this trainer (nanoGPT's layout" in refused(main, args, capsys)
    assert on_disk(out) == before and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("meta", [{}, [], [1, 2], "text", {"tokenizer": "char", "vocab_size": 65}])
def test_a_malformed_meta_is_one_line(data_root, tmp_path, capsys, meta):
    root = copied_dataset(data_root, tmp_path)
    (root / "shakespeare_char" / "meta.json").write_text(json.dumps(meta))
    assert "is not a dataset's meta" in refused(
        train.main, short_args(root, tmp_path / "run"), capsys)
    assert not (tmp_path / "run").exists()


def test_out_dir_naming_a_file_is_one_line(data_root, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    before = out.stat().st_mtime_ns
    assert "is a file, not a folder" in refused(train.main, short_args(data_root, out), capsys)
    assert out.read_text() == "mine" and out.stat().st_mtime_ns == before


def test_a_checkpoint_missing_a_tensor_is_one_line_naming_it(data_root, paused_run, tmp_path,
                                                             capsys):
    out = copy_of(paused_run, tmp_path)
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        del ckpt["model"]["transformer.h.0.attn.c_attn.weight"]
        torch.save(ckpt, out / name)
    before = on_disk(out)
    for main, args in ((train.main, short_args(data_root, out, init_from="resume")),
                       (sample.main, [f"--out_dir={out}", "--device=cpu"])):
        assert "lacks transformer.h.0.attn.c_attn.weight" in refused(main, args, capsys)
    assert on_disk(out) == before


def test_a_binary_prompt_file_is_one_line(paused_run, tmp_path, capsys):
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    err = refused(sample.main, [f"--out_dir={paused_run}", f"--start=FILE:{binary}",
                                "--device=cpu"], capsys)
    assert "is not UTF-8 text" in err or "cannot be read as UTF-8 text" in err


def test_plot_into_a_missing_folder_is_one_line(paused_run, tmp_path, capsys):
    err = refused(plot.main, [str(paused_run / "log.jsonl"), "-o",
                              str(tmp_path / "missing_dir" / "x.png")], capsys)
    assert "missing_dir does not exist" in err


def test_an_absurd_batch_size_is_one_line(data_root, tmp_path, capsys):
    err = refused(train.main, short_args(data_root, tmp_path / "run", batch_size=10**15), capsys)
    assert "do not fit in memory" in err and "--batch_size" in err and "--eval_iters" in err
    assert not (tmp_path / "run").exists()


# ---- 8. settings that were accepted and wrong ----

@pytest.mark.parametrize(("setting", "message"), [
    ({"learning_rate": -1}, "learning_rate must be > 0, got -1.0"),
    ({"beta1": 2}, "beta1 must be in [0, 1), got 2.0"),
    ({"beta2": 1}, "beta2 must be in [0, 1)"),
    ({"grad_clip": -1}, "grad_clip must be >= 0"),
    ({"weight_decay": -1}, "weight_decay must be >= 0"),
    ({"stop_iter": -5}, "stop_iter must be >= 0, got -5"),
    ({"warmup_iters": 50}, "warmup_iters 50 is more than max_iters 20"),
    ({"warmup_iters": 10, "lr_decay_iters": 5},
     "lr_decay_iters 5 ends the decay before warmup_iters 10"),
    ({"min_lr": 1e-2}, "min_lr must be between 0 and learning_rate"),
    ({"muon_lr": 0.0}, "muon_lr must be > 0"),
    ({"muon_split": "rows"}, "muon_split must be head or whole, got 'rows'"),
    ({"loss_spike_factor": 0.5}, "loss_spike_factor must be > 1"),
    ({"n_embd": 48, "n_head": 5}, "n_embd 48 must be divisible by n_head 5"),
])
@pytest.mark.slow
def test_out_of_range_settings_are_refused_before_anything_is_written(data_root, tmp_path, capsys,
                                                                      setting, message):
    assert message in refused(
        train.main, short_args(data_root, tmp_path / "run", **setting), capsys)
    assert not (tmp_path / "run").exists()


# ---- 9. honest words ----

def test_init_from_a_missing_folder_names_the_folder(data_root, tmp_path, capsys):
    err = refused(train.main, short_args(data_root, tmp_path / "run",
                                         init_from=tmp_path / "nonexistent"), capsys)
    assert f"init_from {tmp_path / 'nonexistent'} is neither" in err and "BPE" not in err


def test_a_whole_checkpoint_that_weights_only_refuses_is_not_called_corrupt(paused_run, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = torch.load(paused_run / "best.pt", weights_only=True)
    torch.save({**ckpt, "note": fractions.Fraction(1, 3)}, out / "best.pt")  # weights_only refuses
    err = refused(sample.main, [f"--out_dir={out}", "--device=cpu"], capsys)
    assert "holds Python objects besides tensors" in err and "corrupt" not in err


def test_options_export_names_the_models_own_values(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(short_args(data_root, out, max_iters=2, lr_decay_iters=2, warmup_iters=1,
                          eval_interval=2, pos_embedding="rope", norm="rmsnorm", mlp="relu2"))
    err = refused(export.main, [str(out / "best.pt"), str(tmp_path / "hf")], capsys)
    assert "mlp=relu2" in err
    assert not (tmp_path / "hf").exists()


def test_adapters_of_a_lora_run_from_scratch_are_not_exported_with_a_command_that_fails(
        data_root, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(short_args(data_root, out, max_iters=2, lr_decay_iters=2, warmup_iters=1,
                          eval_interval=2, lora_rank=2))
    err = refused(export.main, [str(out / "best.pt"), str(tmp_path / "adapters"),
                                "--adapters_only"], capsys)
    assert "--init_from=scratch" not in err and "without --adapters_only" in err
    assert f"python sample.py --out_dir={out}" in err
    assert not (tmp_path / "adapters").exists()


def test_commands_quote_paths_with_spaces(data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "my runs" / "first run"
    args = short_args(data_root, out, max_iters=2, lr_decay_iters=2, warmup_iters=1,
                      eval_interval=2)
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    train.main(args)
    assert shlex.split(run_record(out)["command"]) == ["python", "train.py", *args]
    export.main([str(out / "best.pt"), str(tmp_path / "hf dir")])
    assert f"hf.load_hf({str(tmp_path / 'hf dir')!r})" in capsys.readouterr().out
    missing = tmp_path / "other data" / "my set"
    err = refused(train.main, short_args(missing.parent, tmp_path / "run", dataset="my set"),
                  capsys)
    command = err[err.index("`") + 1:err.rindex("`")]
    assert shlex.split(command)[-4:] == ["--name", "my set", "--data_root", str(missing.parent)]


# ---- every script: bad input is one line and exit status 2 ----

@pytest.mark.parametrize(("main", "args"), [
    (train.main, ["--no_such_key=1"]),
    (sample.main, ["--top_k=-1"]),
    (eval.main, ["--out=/nonexistent_dir/scores.json", "--task=x"]),
    (export.main, []),
    (export.main, ["a.pt", "folder", "--bogus"]),
    (plot.main, []),
    (compare.main, ["--bogus"]),
    (prepare.main, ["--bogus"]),
    (prepare.main, ["text"]),
], ids=["train", "sample", "eval", "export-missing", "export-unknown", "plot", "compare",
        "prepare-option", "prepare-input"])
def test_every_script_ends_bad_input_in_one_line(main, args, capsys):
    refused(main, args, capsys)


def test_a_folder_that_holds_no_checkpoint_is_named_so(tmp_path, capsys):
    hf, out = tmp_path / "hf", str(tmp_path / "out")
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    err = refused(export.main, [str(hf), out], capsys)
    assert "hf is a Hugging Face folder (config.json), not a checkpoint" in err
    assert "run folder that holds one" in refused(export.main, [str(tmp_path / "run"), out], capsys)
