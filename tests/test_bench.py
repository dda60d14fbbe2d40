"""Smoke tests of the bench scripts: each runs on a tiny model and writes its JSON report."""

import json
from pathlib import Path

import pytest
from conftest import PLAY, run_here, tiny_args

import prepare
from bench import time_to_loss

pytestmark = pytest.mark.slow  # processes of their own: the full suite's, not the quick tier's

TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--device=cpu"]
SCRIPTS = ["bench/train_speed.py", "bench/sample_speed.py", "bench/data_speed.py",
           "bench/attention_speed.py", "bench/step_memory.py"]


def report_of(script, args, tmp_path):
    out = tmp_path / "report.json"
    run_here(script, [*args, f"--out={out}"])
    report = json.loads(out.read_text())
    assert report["command"].startswith(f"python {script} ")
    assert (report["device"] and report["torch"] and report["date"]
            and isinstance(report["cpu_bf16"], bool))
    return report


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_key_and_unknown_keys_are_one_line_errors(script):
    result = run_here(script, ["--help"])
    assert (result.returncode == 0 and "--out=bench/results/" in result.stdout
            and "--device=auto" in result.stdout)
    result = run_here(script, ["--no_such_key=1"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown key --no_such_key; see --help for the keys"


@pytest.mark.parametrize(("script", "arg", "message"), [
    ("bench/train_speed.py", "--steps=0", "steps must be > 0, got 0"),
    ("bench/data_speed.py", "--dropout=1", "dropout must be in [0, 1), got 1.0"),
    ("bench/optimizer_speed.py", "--muon_split=x", "muon_split must be head or whole, got 'x'"),
    ("bench/sample_speed.py", "--n_head=5", "n_embd 768 must be divisible by n_head 5"),
])
def test_a_key_outside_its_tag_is_a_one_line_error(script, arg, message):
    """The bench keys' ranges are their tags, refused by load_config before anything runs (the
    shape's heads, which no tag can say, by model.check_options)."""
    result = run_here(script, [arg], check=False)
    assert (result.returncode, result.stderr, result.stdout) == (2, f"error: {message}\n", "")


def test_train_speed_compares_with_fp32_eager(tmp_path):
    report = report_of("bench/train_speed.py", [*TINY_MODEL, "--vocab_size=100", "--batch_size=4",
                                                "--steps=2", "--warmup_steps=1", "--rounds=2",
                                                "--dtype=bfloat16", "--compare_fp32_eager=True"],
                       tmp_path)
    assert (report["dtype"] == "bfloat16" and report["compile"] is False
            and report["compile_s"] is None)
    assert report["tokens_per_step"] == 4 * 32 and report["steps_timed"] == 4
    assert (report["tokens_per_sec"] > 0 and report["ms_per_step_median"] > 0
            and report["flops_per_token"] > 0)
    assert report["mfu"] is None and "CPU" in report["mfu_note"] and report["peak_memory_mib"] > 0
    baseline = report["baseline"]
    assert (baseline["dtype"] == "float32" and baseline["steps_timed"] == 4
            and baseline["tokens_per_sec"] > 0)
    assert report["speedup"] == pytest.approx(baseline["ms_per_step_median"]
                                              / report["ms_per_step_median"])
    assert "matmul_ms_per_step" not in report and "matmul_speedup" not in report


def test_train_speed_times_the_steps_matmuls_alone(tmp_path):
    report = report_of("bench/train_speed.py", [*TINY_MODEL, "--vocab_size=100", "--batch_size=4",
                                                "--steps=2", "--warmup_steps=1", "--rounds=2",
                                                "--dtype=bfloat16", "--compare_fp32_eager=True",
                                                "--time_matmuls=True"], tmp_path)
    for result in (report, report["baseline"]):
        # each of the 2 layers' 4 projections and the head: one matmul forward, two backward
        assert result["matmuls_per_step"] == 3 * (4 * 2 + 1)
        # the share, a ratio of timings taken apart, may pass 1 under load: its arithmetic is tested
        assert 0 < result["matmul_ms_per_step"]
        assert result["matmul_share"] == pytest.approx(result["matmul_ms_per_step"]
                                                       / result["ms_per_step_median"])
        assert (result["matmul_ms_per_step"] + result["rest_ms_per_step"]
                == pytest.approx(result["ms_per_step_median"]))
    baseline = report["baseline"]
    assert report["matmul_speedup"] == pytest.approx(baseline["matmul_ms_per_step"]
                                                     / report["matmul_ms_per_step"])


def test_train_speed_mfu_against_a_given_peak(tmp_path):
    report = report_of("bench/train_speed.py", [*TINY_MODEL, "--vocab_size=100", "--batch_size=2",
                                                "--steps=2", "--warmup_steps=0", "--dtype=float32",
                                                "--peak_flops=1e12"], tmp_path)
    assert "baseline" not in report and report["steps_timed"] == 2
    assert report["mfu"] == pytest.approx(report["flops_per_token"] * report["tokens_per_sec"]
                                          / 1e12)


def test_sample_speed_kv_cache_matches_recomputation(tmp_path):
    # 30 + 10 tokens outgrow block_size 32, so the cropped path is compared too
    report = report_of("bench/sample_speed.py", [*TINY_MODEL, "--vocab_size=100",
                                                 "--prompt_lengths=4,30", "--new_tokens=10"],
                       tmp_path)
    assert report["tokens_match"] is True and len(report["cases"]) == 2
    for case in report["cases"]:
        assert (case["tokens_match"] and case["kv_cache_tokens_per_sec"] > 0
                and case["recompute_tokens_per_sec"] > 0)
        assert case["speedup"] == pytest.approx(case["recompute_s"] / case["kv_cache_s"])
    assert report["issue_check"] is None  # the 16-token, 500-token case is not in this grid


def test_data_speed_reports_loader_share_and_tokenizer_throughput(tmp_path):
    prepare.prepare("shakespeare_char", inputs=[str(PLAY)], data_root=tmp_path / "data")
    report = report_of("bench/data_speed.py",
                       [*TINY_MODEL, "--batch_size=4", "--steps=3", "--warmup_steps=1",
                        f"--data_root={tmp_path / 'data'}", "--dataset=shakespeare_char",
                        f"--tokenize_input={PLAY}", "--tokenize_repeats=1"],
                       tmp_path)
    loader = report["loader"]
    assert loader["batch_ms"] > 0 and loader["step_ms"] > 0 and 0 < loader["loader_share_pct"] < 100
    assert set(report["tokenize"]) == {"byte", "gpt2"}
    for result in report["tokenize"].values():
        assert result["mb_per_sec"] > 0 and result["source_bytes"] == PLAY.stat().st_size
    assert (report["tokenize"]["gpt2"]["bytes_per_token"]
            > 2 * report["tokenize"]["byte"]["bytes_per_token"])


def test_attention_speed_times_each_precision_per_shape(tmp_path):
    report = report_of("bench/attention_speed.py", ["--shapes=2x2x8x16,1x2x16x8", "--steps=2",
                                                    "--warmup_steps=1", "--device=cpu"], tmp_path)
    assert [result["shape"] for result in report["results"]] == [[2, 2, 8, 16], [1, 2, 16, 8]]
    for result in report["results"]:
        assert (set(result["ms"]) == {"fp32", "bf16", "bf16 computed in fp32"}
                and min(result["ms"].values()) > 0)
    refused = run_here("bench/attention_speed.py", ["--shapes=2x2x8"], check=False)
    assert refused.stderr.startswith("error: shapes must be")


def test_step_memory_measures_each_way_in_its_own_process(tmp_path):
    report = report_of("bench/step_memory.py", [*TINY_MODEL, "--vocab_size=4096", "--batch_size=4",
                                                "--gradient_accumulation_steps=3", "--steps=1",
                                                "--dtype=float32"], tmp_path)
    assert report["one_micro_batch_logits_fp32_mib"] == 4 * 32 * 4096 * 4 / 2**20
    for way in ("loss_only", "logits_held"):
        assert report[way]["way"] == way and report[way]["peak_mib"] > report[way]["before_mib"] > 0
    assert (report["saved_mib"]
            == report["logits_held"]["step_mib"] - report["loss_only"]["step_mib"])


def test_time_to_loss_splits_recipes_where_a_recipe_starts():
    text = "config/a.py,config/b.py --lora_targets=attn,mlp --seed=2, --mlp=relu2,config/c.py"
    assert time_to_loss.split_recipes(text) == ["config/a.py",
                                                "config/b.py --lora_targets=attn,mlp --seed=2",
                                                "--mlp=relu2", "config/c.py"]


def test_time_to_loss_trains_recipes_in_turns_to_the_target(data_root, tmp_path):
    recipe = tmp_path / "slow.py"
    recipe.write_text("learning_rate = 1e-4\nmax_iters = 20\nlr_decay_iters = 20\n"
                      "warmup_iters = 5\n")
    # the second, the same config with its own argument
    recipes = [str(recipe), f"{recipe} --learning_rate=3e-3"]
    recipe_keys = ("--out_dir", "--max_iters", "--lr_decay_iters", "--warmup_iters",
                   "--learning_rate")
    common_args = " ".join(a for a in tiny_args(data_root, "unused", eval_interval=10,
                                                sample_interval=0)
                           if not a.startswith(recipe_keys))
    report = report_of("bench/time_to_loss.py",
                       [f"--recipes={','.join(recipes)}", "--target_val_loss=3.95",
                        "--turn_steps=10", f"--shared_args={common_args}", "--val_at_steps=10,20",
                        f"--out_root={tmp_path / 'runs'}"], tmp_path)
    slow, fast = report["results"]
    assert Path(fast["out_dir"]).name == "slow+learning_rate=3e-3"
    assert (fast["reached"] and fast["steps"] % 10 == 0 and 0 < fast["train_seconds"]
            and fast["tokens"] > 0)
    assert not slow["reached"] and slow["steps"] == 20 and slow["end_reason"] == "finished"
    assert slow["val_at"]["20"] == slow["best_val_loss"] and fast["val_at"]["10"] <= 3.95
    assert fast["steps_ratio"] == fast["steps"] / 20 and slow["train_seconds_ratio"] == 1.0
