import contextlib
import faulthandler
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

import prepare

# on sys.path for the imports (pyproject.toml's pythonpath)
ROOT = Path(__file__).resolve().parents[1]
# The text the tests train and prepare on: a made-up play in tiny shakespeare's layout, with its
# 65 characters, written by tests/fixtures/make_play.py (48 KB). Nothing outside the repo is read.
PLAY = ROOT / "tests" / "fixtures" / "play.txt"


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`) the workers share the cores: one thread each, and for the scripts
    they start (train.py honours OMP_NUM_THREADS), so that two workers do not contend for a core."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The play prepared as the shakespeare_char dataset (character level, 90% train / 10% val)."""
    root = tmp_path_factory.mktemp("data")
    prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=root)
    return root


GPT2_ADAMW = {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False,
              "optimizer": "adamw", "learning_rate": 1e-3}


def tiny_args(data_root, out_dir, recipe=GPT2_ADAMW, **overrides):
    """A model small enough that a few dozen steps take seconds on two cores; GPT-2's architecture
    and AdamW (train.py's defaults are the modern options and Muon) unless `recipe` says otherwise
    ({}: the defaults)."""
    args = {"dataset": "shakespeare_char", "data_root": data_root, "out_dir": out_dir, "n_layer": 2,
            "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8, "max_iters": 40,
            "lr_decay_iters": 40, "warmup_iters": 5, "eval_interval": 20, "eval_iters": 4,
            "log_interval": 5, "ckpt_interval": 20, "sample_interval": 20, "sample_tokens": 20,
            "dropout": 0.1, "dtype": "float32", "compile": "false", "device": "cpu", **recipe}
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def run_script(script, args, check=True, timeout=300):
    result = subprocess.run([sys.executable, script, *args], check=False, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def run_here(script, args, check=True, timeout=300):
    """run_script's result from the script run as __main__ in this process: no interpreter or torch
    to start (seconds a run). As `python script args`, but on this process's modules (a test's
    monkeypatches apply) and with no interpreter exit; its warnings, shown as the interpreter's
    default filters would, end its stderr. For runs whose outcome a test reads; a test of the
    process itself (signals, memory, torchrun) uses run_script."""
    argv, out, err = [str(script), *map(str, args)], io.StringIO(), io.StringIO()
    with (process_state_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          patch.object(sys, "argv", argv), warnings.catch_warnings(record=True) as shown):
        interpreter_warning_filters()
        # a hang ends the worker (its traceback on the real stderr), not CI
        faulthandler.dump_traceback_later(timeout, exit=True, file=sys.__stderr__)
        try:
            os.chdir(ROOT)  # where run_script runs it
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter ends: None is 0, a message printed is 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        for w in shown:
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    result = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, result.stderr
    return result


def interpreter_warning_filters():
    """A fresh interpreter's: each warning once per place, deprecations only from __main__."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")


@contextlib.contextmanager
def process_state_kept():
    """The process-wide settings a script may change, put back after it: threads, deterministic
    mode, the SIGXFSZ handler (train.py ignores it), sys.path, the environment, the directory."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    file_size_signal, path, environ = signal.getsignal(signal.SIGXFSZ), sys.path[:], {**os.environ}
    cwd = os.getcwd()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        signal.signal(signal.SIGXFSZ, file_size_signal)
        sys.path[:] = path
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def prepare_cli(capsys, *argv):
    """prepare.py's command line in this process: (exit status, stdout, stderr)."""
    try:
        prepare.main([str(arg) for arg in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err
