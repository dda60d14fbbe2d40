"""bench/gpu_check.py, the prepared GPU check: its CPU dry run (tiny shapes) runs every section and
reports every figure, so the script is known to work before GPU time is spent on it."""

import json
import sys
import time

import pytest
from conftest import PLAY, run_script

from bench import gpu_check

pytestmark = pytest.mark.slow  # processes of their own: the full suite's, not the quick tier's


def gpt2_figures(gpt2):
    figures = {"ms_per_step", "tokens_per_sec", "mfu", "first_step_s", "peak_memory_mib"}
    return (all(figures <= set(gpt2[name]) for name in ("adamw", "muon_whole", "muon_head"))
            and gpt2["muon_whole_over_adamw"] > 0 and gpt2["muon_head_over_adamw"] > 0)


CHECKS = {  # each section's figures, as the dry run must report them
    "matmul": lambda matmul: matmul["tflops"] > 0,
    "gpt2": gpt2_figures,
    "resume": lambda resume: (resume["resumed_equals_uninterrupted"]
                              and resume["two_uninterrupted_equal"]),
    "fsdp": lambda fsdp: (fsdp["loaded_equals_saved"] and fsdp["next_step_equal"]
                          and fsdp["max_loss_diff"] < 1e-3),
    "tests": lambda tests: tests["status"] == 0 and "skipped" in tests["summary"],  # no GPU here
    "sampling": lambda sampling: all(case["kv_cache_tokens_per_sec"] > 0
                                     for case in sampling["cases"]),
    "muon": lambda muon: all(0.5 < case["singular_min"] <= case["singular_max"] < 1.3
                             for case in muon["cases"]),
    "speedrun": lambda speedrun: (speedrun["ms_per_step"] > 0
                                  and speedrun["projected_8gpu_minutes"] > 0
                                  and "PROJECTION" in speedrun["projection"]),
    "char": lambda char: char["status"] == 0 and char["last_eval"]["val_loss"] > 0,
    "memory": lambda memory: [case["batch_size"] for case in memory["cases"]] == [1, 2],
}


# three runs of about 20 s each, which the suite's workers can share, rather than one of 60 s
GROUPS = ["resume", "tests,speedrun,char", "matmul,gpt2,fsdp,sampling,muon,memory"]


def test_the_checks_and_runs_cover_every_section():
    assert list(CHECKS) == list(gpu_check.SECTIONS)
    assert sorted(",".join(GROUPS).split(",")) == sorted(gpu_check.SECTIONS)


@pytest.mark.parametrize("sections", GROUPS)
def test_the_dry_run_runs_every_section_and_reports_their_figures(tmp_path, sections):
    report_path = tmp_path / "report.json"
    run_script("bench/gpu_check.py", ["--device=cpu", "--tiny=True", f"--text={PLAY}",
                                      f"--sections={sections}", f"--data_root={tmp_path / 'data'}",
                                      f"--work_dir={tmp_path / 'work'}", f"--out={report_path}"],
               timeout=900)
    reported = json.loads(report_path.read_text())["sections"]
    assert list(reported) == sections.split(",")
    assert [name for name, result in reported.items() if "error" in result] == []
    for name, result in reported.items():
        assert CHECKS[name](result), (name, result)


def test_a_process_past_its_time_is_cut_off_with_its_children(tmp_path):
    """A hung section (or the train.py it started, which holds the output file open) ends at its
    time limit."""
    started = time.perf_counter()
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
            "'import time; time.sleep(60)']); time.sleep(60)"
    status, seconds = gpu_check.run_process([sys.executable, "-c", child], 2, tmp_path / "log")
    assert status is None and seconds < 30 and time.perf_counter() - started < 30


def test_an_unknown_section_is_one_line(tmp_path):
    result = run_script("bench/gpu_check.py", ["--sections=gpt2,nope", f"--work_dir={tmp_path}"],
                        check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: sections must name some of {', '.join(gpu_check.SECTIONS)}, got 'gpt2,nope'"]


def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing(tmp_path):
    result = run_script("bench/gpu_check.py", [f"--work_dir={tmp_path / 'work'}",
                                               f"--data_root={tmp_path / 'data'}",
                                               f"--out={tmp_path / 'report.json'}"], check=False)
    assert result.returncode == 2 and "device cuda does not exist" in result.stderr
    assert result.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []
