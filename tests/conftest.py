import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import prepare


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare.prepare("shakespeare_char", inputs=[str(SHARED / "data" / "tinyshakespeare.txt")], data_root=root)
    return root


def tiny_args(data_root, out_dir, **overrides):
    """A model small enough that a few dozen steps take seconds on two cores."""
    args = {"dataset": "shakespeare_char", "data_root": data_root, "out_dir": out_dir, "n_layer": 2,
            "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8, "max_iters": 40, "lr_decay_iters": 40,
            "warmup_iters": 5, "eval_interval": 20, "eval_iters": 4, "log_interval": 5, "ckpt_interval": 20,
            "sample_interval": 20, "sample_tokens": 20, "dropout": 0.1, "dtype": "float32", "compile": "false",
            "device": "cpu"}
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def run_script(script, args, check=True, timeout=300):
    result = subprocess.run([sys.executable, script, *args], check=False, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
