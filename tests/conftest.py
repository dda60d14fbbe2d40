import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
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


def run_here(script, args, check=True):
    """run_script's result from the script run as __main__ in this process, as `python script args`
    would: no interpreter or torch to start (seconds a run). For runs whose outcome a test reads; a
    test of the process itself (signals, memory, torchrun) uses run_script."""
    argv, cwd = [str(script), *map(str, args)], os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          patch.object(sys, "argv", argv)):
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
            os.chdir(cwd)
    result = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, result.stderr
    return result


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
