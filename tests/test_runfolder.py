"""A run folder cannot be wedged: a torn last log line, a second run, an old run's log, bad
plot.py input."""

import json
import socket
import subprocess
import sys
import types

import pytest
import torch
from conftest import run_here

import plot
import runlog

GOOD = (b'{"step": 10, "tokens": 2560, "train_loss": 3.5}\n'
        b'{"step": 10, "tokens": 2560, "train_loss": 3.4, "val_loss": 3.6}\n')


def resumed_runlog(out_dir, step=10):
    cfg = types.SimpleNamespace(seed=1, wandb_log=False, out_dir=str(out_dir))
    log = runlog.RunLog(out_dir, True)
    log.start(cfg, {}, "cpu", torch.float32, 1, resumed_from=step, wandb_id="x")
    return log


@pytest.mark.parametrize("torn", [b'{"step": 696, "tokens": 178176',
                                  b'{"step": 696, "tok\x00\x00\n'])
def test_resume_sets_a_torn_last_line_aside(tmp_path, capsys, torn):
    (tmp_path / "log.jsonl").write_bytes(GOOD + torn)
    log = resumed_runlog(tmp_path)
    assert (tmp_path / "log.jsonl").read_bytes() == GOOD
    assert (tmp_path / "log.jsonl.torn").read_bytes() == torn.rstrip(b"\n") + b"\n"
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "torn line" in said[0] and "log.jsonl.torn" in said[0]
    log.log({"step": 10, "event": "resumed"})
    log.log({"step": 20, "tokens": 5120, "train_loss": 3.0, "val_loss": 3.2})
    log.evaluated(20, 5120, 3.2, 3.2, 20)
    assert [r["step"] for r in runlog.read_log(tmp_path / "log.jsonl")] == [10, 10, 10, 20]
    assert (tmp_path / "loss.png").exists() and capsys.readouterr().out == ""


def test_resume_leaves_a_whole_log_alone(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_bytes(GOOD)
    resumed_runlog(tmp_path)
    assert ((tmp_path / "log.jsonl").read_bytes() == GOOD
            and not (tmp_path / "log.jsonl.torn").exists())
    assert capsys.readouterr().out == ""


def test_readers_skip_torn_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 5, "tokens": 1, "train_loss": 4.0}\n'
                     b'{"step": 6, "tok{"step": 6, "event": "resumed"}\n'
                     + GOOD + b"[1, 2]\n" + b'{"step": 696, "tokens": 178176')
    assert [r["step"] for r in runlog.read_log(path)] == [5, 10, 10]
    assert plot.read_curves(path) == {"train": [(1, 4.0), (2560, 3.5)], "val": [(2560, 3.6)],
                                      "task": []}


def test_plot_script_draws_a_log_with_a_torn_last_line(tmp_path):
    (tmp_path / "log.jsonl").write_bytes(GOOD + b'{"step": 696, "tokens": 178176')
    png = tmp_path / "out.png"
    run_here("plot.py", [tmp_path / "log.jsonl", "-o", png])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_plot_never_stops_training(tmp_path, capsys, monkeypatch):
    def broken_draw(*args):
        raise ValueError("bad figure")

    monkeypatch.setattr(plot, "draw", broken_draw)
    log = resumed_runlog(tmp_path)
    log.evaluated(20, 5120, 3.2, 3.2, 20)
    log.evaluated(30, 7680, 3.1, 3.1, 30)
    said = capsys.readouterr().out.splitlines()
    assert (len(said) == 1
            and said[0].startswith("warning: loss.png not drawn (ValueError: bad figure)"))
    assert json.loads((tmp_path / "run.json").read_text())["best_step"] == 30


def write_lock(out_dir, pid, host=None):
    (out_dir / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                               "started": "2025-01-01T00:00:00+00:00"}))


def test_lock_refuses_a_second_run_and_release_removes_it(tmp_path):
    lock = runlog.RunFolderLock(tmp_path / "run")
    owner = json.loads((tmp_path / "run" / ".lock").read_text())
    with pytest.raises(runlog.RunFolderError) as refused:
        runlog.RunFolderLock(tmp_path / "run")
    message = str(refused.value)
    assert ("\n" not in message
            and f"pid {owner['pid']} on {owner['host']}, since {owner['started']}" in message)
    assert "--out_dir" in message and ".lock" in message
    lock.release()
    # made by the lock for a run that wrote nothing: left as it was
    assert not (tmp_path / "run").exists()
    lock = runlog.RunFolderLock(tmp_path / "run")
    (tmp_path / "run" / "log.jsonl").write_bytes(GOOD)
    lock.release()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["log.jsonl"]


def test_out_dir_that_is_a_file_refused_in_one_line(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(runlog.RunFolderError, match="choose another --out_dir"):
        runlog.RunFolderLock(tmp_path / "run")


def test_lock_of_another_live_process_refused_then_taken_over_once_it_is_gone(tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, other.pid)
        with pytest.raises(runlog.RunFolderError,
                           match=f"pid {other.pid} on {socket.gethostname()}"):
            runlog.RunFolderLock(tmp_path)
    finally:
        other.kill()
        other.wait()
    lock = runlog.RunFolderLock(tmp_path)
    assert f"its run (pid {other.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / ".lock").read_text())["pid"] != other.pid
    lock.release()


@pytest.mark.parametrize("content", ["", "{not json", '{"pid": 1}'])
def test_unreadable_lock_refused(tmp_path, content):
    (tmp_path / ".lock").write_text(content)
    with pytest.raises(runlog.RunFolderError, match="cannot be read"):
        runlog.RunFolderLock(tmp_path)


def test_lock_of_another_host_refused_even_with_a_pid_gone_here(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, dead.pid, host="another-machine")
    with pytest.raises(runlog.RunFolderError, match=f"pid {dead.pid} on another-machine"):
        runlog.RunFolderLock(tmp_path)


def test_fresh_run_refuses_a_folder_with_an_old_log_and_a_checkpoint(tmp_path):
    runlog.check_fresh_folder(tmp_path / "new")
    runlog.check_fresh_folder(tmp_path)
    (tmp_path / "log.jsonl").write_bytes(GOOD)
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(runlog.RunFolderError) as refused:
        runlog.check_fresh_folder(tmp_path)
    assert ("\n" not in str(refused.value) and "--out_dir" in str(refused.value)
            and "resume" not in str(refused.value))
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(runlog.RunFolderError, match="--init_from=resume"):
        runlog.check_fresh_folder(tmp_path)


def test_records_without_a_checkpoint_are_set_aside_for_a_fresh_run(tmp_path, capsys):
    """A run that failed before its first save left records nothing can resume: a new run starts."""
    (tmp_path / "log.jsonl").write_bytes(GOOD)
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "earlier-1").mkdir()
    runlog.check_fresh_folder(tmp_path)
    assert sorted(p.name for p in (tmp_path / "earlier-2").iterdir()) == ["log.jsonl", "run.json"]
    assert (not (tmp_path / "log.jsonl").exists()
            and (tmp_path / "earlier-2" / "log.jsonl").read_bytes() == GOOD)
    assert "set aside in earlier-2/, and this run starts afresh" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing log", "log is a folder", "no loss lines",
                                  "missing output folder", "output is a folder"])
def test_plot_script_bad_input_is_one_line_and_exit_2(tmp_path, case):
    log, output = tmp_path / "log.jsonl", tmp_path / "loss.png"
    log.write_bytes(GOOD)
    if case == "missing log":
        log = tmp_path / "nothing.jsonl"
    elif case == "log is a folder":
        log = tmp_path
    elif case == "no loss lines":
        log.write_text('{"step": 0, "event": "resumed"}\n{"step": 1, "sample": "hi"}\n')
    elif case == "missing output folder":
        output = tmp_path / "missing_dir" / "x.png"
    else:
        output = tmp_path
    result = run_here("plot.py", [log, "-o", output], check=False)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
