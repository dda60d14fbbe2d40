"""What a run decides and records: stop rules (target_val_loss, early stopping), the val loss's
standard error, the test split scored once, task accuracy while training, the leakage warning; what
its checkpoints and log lines cost and hold (best.pt weights only, ckpt_s, both throughputs)."""

import json
import math

import pytest
import torch
from conftest import PLAY, read_log, run_here, tiny_args

import prepare
import train
from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # processes of their own: the full suite's, not the quick tier's


def run_record(out_dir):
    return json.loads((out_dir / "run.json").read_text())


def test_target_val_loss_stops_at_the_first_evaluation_reaching_it_and_resume_says_done(
        data_root, tmp_path):
    out = tmp_path / "out"
    args = tiny_args(data_root, out, max_iters=200, lr_decay_iters=200, eval_interval=5,
                     target_val_loss=3.9, dropout=0.0)
    run_here("train.py", args)
    evals = [r for r in read_log(out) if "val_loss" in r]
    reached = next(r for r in evals if r["step"] > 0 and r["val_loss"] <= 3.9)
    assert evals[-1] == reached and reached["step"] < 200  # stopped there, not at max_iters
    record = run_record(out)
    assert (record["end_reason"].startswith("reached target_val_loss 3.9")
            and record["target_step"] == reached["step"])
    assert record["target_tokens"] == reached["tokens"]
    assert 0 < record["target_train_seconds"] <= record["train_seconds"]
    assert load_checkpoint(out / "last.pt")["step"] == reached["step"]
    again = run_here("train.py", [*args, "--init_from=resume"])
    assert "is done: it reached target_val_loss 3.9" in again.stdout
    assert load_checkpoint(out / "last.pt")["step"] == reached["step"]  # nothing trained
    assert run_record(out)["end_reason"].startswith("reached target_val_loss 3.9")


def test_early_stopping_counts_evaluations_without_improvement(data_root, tmp_path):
    out = tmp_path / "out"
    # a zero lr after warmup never improves: patience 2 ends the run two evaluations after its best
    run_here("train.py", tiny_args(data_root, out, max_iters=100, lr_decay_iters=6, warmup_iters=5,
                                   min_lr=0.0, eval_interval=5, early_stop_patience=2,
                                   early_stop_min_delta=0.01))
    evals = [r for r in read_log(out) if "val_loss" in r and r["step"] > 0]
    best, last_improving = math.inf, None
    for r in evals:
        if r["val_loss"] < best - 0.01:
            last_improving = r["step"]
        best = min(best, r["val_loss"])
    record = run_record(out)
    assert record["end_reason"].startswith("early stop: 2 evaluations without improving val loss "
                                           "by more than 0.01")
    assert evals[-1]["step"] == last_improving + 10 < 100
    assert f"best at step {record['best_step']}" in record["end_reason"]


def test_val_loss_standard_error_is_that_of_the_batch_losses():
    class FixedLosses(torch.nn.Module):
        def forward(self, x, y):
            return None, x.float().mean()

    batches = {"val": [(torch.full((2, 3), float(v)), torch.zeros(2, 3)) for v in (1, 2, 3, 6)]}
    mean, se = train.estimate_loss(FixedLosses(), batches, "cpu",
                                   torch.autocast("cpu", enabled=False))["val"]
    assert mean == 3.0 and se == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 3 / 4))
    # losses near 3.44 that differ in the fourth decimal: E[x^2] - mean^2 in float32 gave 0
    values = (3.4438, 3.4446)
    batches = {"val": [(torch.full((2, 3), v), torch.zeros(2, 3)) for v in values]}
    _, se = train.estimate_loss(FixedLosses(), batches, "cpu",
                                torch.autocast("cpu", enabled=False))["val"]
    assert se == pytest.approx(0.0004, rel=1e-3)  # sample std 0.0004 * sqrt(2), over sqrt(2)


def test_a_test_split_is_scored_once_with_the_selected_checkpoint(tmp_path):
    data = tmp_path / "data"
    prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=data, val_fraction=0.2,
                    test_fraction=0.1)
    out = tmp_path / "out"
    run_here("train.py", tiny_args(data, out, dropout=0.0))
    tests = [r for r in read_log(out) if "test_loss" in r]
    record = run_record(out)
    assert (len(tests) == 1 and record["test_loss"] == tests[0]["test_loss"]
            and record["test_checkpoint"] == "best.pt")
    assert 0 < record["test_loss_se"] < 0.5 and record["test_loss"] < math.log(65)


def test_without_a_test_split_run_json_names_no_test_loss(data_root, tmp_path):
    out = tmp_path / "out"
    run_here("train.py", tiny_args(data_root, out, max_iters=10, lr_decay_iters=10,
                                   eval_interval=5))
    assert "test_loss" not in run_record(out) and not [r for r in read_log(out) if "test_loss" in r]
    evals = [r for r in read_log(out) if "val_loss" in r]
    assert (all(r["val_loss_se"] > 0 for r in evals)
            and run_record(out)["final_val_loss_se"] == evals[-1]["val_loss_se"])


def test_task_accuracy_is_logged_while_training(data_root, tmp_path):
    task = tmp_path / "task.jsonl"
    lines = [line for line in PLAY.read_text().splitlines() if line.strip()][:200]
    task.write_text("".join(json.dumps({"ctx": lines[i],
                                        "endings": [lines[i + 1], lines[i + 7], lines[i + 3]],
                                        "label": 0}) + "\n" for i in range(0, 150, 10)))
    out = tmp_path / "out"
    run_here("train.py", tiny_args(data_root, out, max_iters=20, lr_decay_iters=20,
                                   eval_interval=10, task_eval=task, task_eval_examples=12))
    scores = [r for r in read_log(out) if "task_acc" in r]
    assert [r["step"] for r in scores] == [0, 10, 20] and all(r["task_n"] == 12 for r in scores)
    assert all(0 <= r["task_acc"] <= 1 and 0 <= r["task_acc_norm"] <= 1 for r in scores)
    record = run_record(out)
    assert record["task_acc_norm"] == scores[-1]["task_acc_norm"]
    assert record["best_task_acc_norm"] == max(r["task_acc_norm"] for r in scores)


def test_a_leakage_audit_count_is_a_warning_at_start(data_root, tmp_path):
    leaky = tmp_path / "data"
    (leaky / "shakespeare_char").mkdir(parents=True)
    for path in (data_root / "shakespeare_char").iterdir():
        (leaky / "shakespeare_char" / path.name).write_bytes(path.read_bytes())
    meta_path = leaky / "shakespeare_char" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["leakage"] = {"unit": "paragraph", "val_docs": 30, "val_in_train": 3}
    meta_path.write_text(json.dumps(meta))
    result = run_here("train.py", tiny_args(leaky, tmp_path / "out", max_iters=5, lr_decay_iters=5))
    assert ("warning: 3 val/test paragraphs of shakespeare_char also occur verbatim in train"
            in result.stdout)


def test_best_pt_holds_weights_only_and_every_save_and_both_throughputs_are_logged(
        data_root, tmp_path):
    out = tmp_path / "out"
    run_here("train.py", tiny_args(data_root, out, max_iters=20, lr_decay_iters=20,
                                   eval_interval=5, ckpt_interval=10))
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert ("optimizer" not in best and "rng" not in best
            and {"optimizer", "rng", "scaler"} <= last.keys())
    assert (best["step"] == run_record(out)["best_step"]
            and best["model"].keys() == last["model"].keys())
    saves = [r for r in read_log(out) if "ckpt_s" in r]
    assert ({r["checkpoint"] for r in saves} == {"best.pt", "last.pt"}
            and all(r["ckpt_s"] >= 0 for r in saves))
    assert [r["step"] for r in saves if r["checkpoint"] == "last.pt"] == [10, 20]
    lines = [r for r in read_log(out) if "lr" in r]
    assert all(r["tok_per_sec"] > 0 and r["wall_tok_per_sec"] > 0 for r in lines)
    # the process's peak, torch included (CUDA: per line)
    assert all(r["peak_rss_mib"] > 100 for r in lines)
    run_here("sample.py", [f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=5",
                           "--device=cpu"])
    run_here("export.py", [str(out / "best.pt"), str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "model.safetensors").exists()
