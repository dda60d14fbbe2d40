"""compare.py: the table and plot for real runs, the verdict rule and matched-token values on
hand-written run folders, and one-line errors for bad input."""

import json

import pytest
from conftest import run_here, run_script, tiny_args

import compare


@pytest.fixture(scope="module")
def two_runs(data_root, tmp_path_factory):
    """Two tiny real runs that differ only in learning rate (seconds each)."""
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("out-base", 1e-3), ("out-a", 3e-3)):
        run_here("train.py", tiny_args(data_root, root / name, learning_rate=lr))
    return root


@pytest.mark.slow
def test_real_runs_give_a_table_a_verdict_and_a_plot(two_runs):
    png = two_runs / "cmp.png"
    result = run_script("compare.py", [str(two_runs / "out-base"), str(two_runs / "out-a"), "-o",
                                       str(png)])
    lines = result.stdout.splitlines()
    print(result.stdout)
    # 40 steps x 256 tokens
    assert lines[0].split()[:3] == ["run", "best", "val"] and "val@10,240 tok" in lines[0]
    assert lines[1].startswith("out-base ") and lines[2].startswith("out-a ")
    assert lines[1].split()[-2:] == ["best.pt", "finished"]
    assert sum(line.startswith("out-a vs out-base: ") for line in lines) == 1
    assert lines[-1] == f"wrote {png}" and png.stat().st_size > 0


def write_run(folder, evals, wall_tok_per_sec=None, **record):
    """A run folder by hand: evals are (step, tokens, val_loss, val_loss_se or None); a train line
    per eval."""
    folder.mkdir()
    lines = []
    wall = {"wall_tok_per_sec": wall_tok_per_sec} if wall_tok_per_sec else {}
    for step, tokens, val, se in evals:
        lines.append({"step": step, "tokens": tokens, "train_loss": val - 0.1,
                      "tok_per_sec": 1000.0 + step, **wall})
        lines.append({"step": step, "tokens": tokens, "train_loss": val - 0.1, "val_loss": val,
                      **({"val_loss_se": se} if se is not None else {})})
    (folder / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    best_step, best = min(((s, v) for s, _, v, _ in evals if s > 0), key=lambda e: e[1])
    record = {"best_val_loss": best, "best_step": best_step, "end_reason": "finished",
              "selected_checkpoint": "best.pt", **record}
    (folder / "run.json").write_text(json.dumps(record))
    return folder


def cell(header, row, title):
    """The value under a column: all but the first are right-aligned, so it ends where its title
    ends."""
    return row[:header.index(title) + len(title)].split()[-1]


def compare_out(capsys, *folders, extra=()):
    compare.main([*map(str, folders), "-o", str(folders[0].parent / "cmp.png"), *extra])
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("best, word", [(2.90, "better"), (3.10, "worse"), (2.95, "within noise"),
                                        (3.05, "within noise")])
def test_verdict_weighs_the_difference_against_two_standard_errors(tmp_path, capsys, best,
                                                                   word):
    # threshold 2 * sqrt(0.02^2 + 0.02^2) = 0.0566; the se is the eval line's at the best step
    base = write_run(tmp_path / "base", [(0, 0, 4.0, 0.5), (10, 1000, 3.0, 0.02),
                                         (20, 2000, 3.2, 0.9)])
    run = write_run(tmp_path / "run", [(0, 0, 4.0, 0.5), (10, 1000, best, 0.02),
                                       (20, 2000, 3.3, 0.9)])
    verdicts = [line for line in compare_out(capsys, base, run)
                if line.startswith("run vs base: ")]
    assert verdicts == [f"run vs base: {word}: best val {best:.4f} vs 3.0000, "
                        f"difference {best - 3.0:+.4f}, "
                        "noise threshold 0.0566 (2 * sqrt(se_base^2 + se_run^2))"]


def test_without_standard_errors_the_verdict_is_unknown(tmp_path, capsys):
    base = write_run(tmp_path / "base", [(0, 0, 4.0, None), (10, 1000, 3.0, None)])
    run = write_run(tmp_path / "run", [(0, 0, 4.0, None), (10, 1000, 2.5, 0.01)])
    lines = compare_out(capsys, base, run)
    assert ("run vs base: unknown: no standard error recorded (base); best val 2.5000 vs 3.0000, "
            "difference -0.5000" in lines)


def test_val_at_the_largest_token_count_every_run_reached(tmp_path, capsys):
    base = write_run(tmp_path / "base", [(0, 0, 4.0, None), (10, 1000, 3.4, None),
                                         (20, 2000, 3.2, None), (30, 3000, 3.0, None)])
    run = write_run(tmp_path / "run", [(0, 0, 4.0, None), (10, 1500, 3.5, None),
                                       (20, 2500, 3.3, None)])
    header, base_row, run_row = compare_out(capsys, base, run)[:3]
    title = "val@2,500 tok"  # the shorter run's last evaluation
    assert cell(header, base_row, title) == "3.1000"  # halfway: 3.2 at 2,000 tokens, 3.0 at 3,000
    assert cell(header, run_row, title) == "3.3000"
    assert compare.val_at([{"tokens": 0, "val_loss": 4.0}, {"tokens": 100, "val_loss": 3.0}],
                          25) == 3.75
    assert compare.val_at([{"tokens": 50, "val_loss": 4.0}], 25) is None


def test_optional_fields_show_when_written_and_dashes_when_not(tmp_path, capsys):
    base = write_run(tmp_path / "base", [(0, 0, 4.0, None), (10, 1000, 3.0, 0.01)],
                     test_loss=3.1, task_acc_norm=0.3125, wall_tok_per_sec=900.0,
                     train_seconds=125.0)
    run = write_run(tmp_path / "run", [(0, 0, 4.0, None), (10, 1000, 2.9, 0.01)],
                    started="2024-01-01T00:00:00+00:00", ended="2024-01-01T01:02:03+00:00")
    header, base_row, run_row = compare_out(capsys, base, run)[:3]
    assert header.split()[-8:] == ["test", "task_acc_norm", "tok/s", "wall", "tok/s", "time",
                                   "checkpoint", "end"]
    assert base_row.split() == ["base", "3.0000", "±", "0.0100", "10", "3.0000", "±", "0.0100",
                                "3.0000", "3.1000", "0.3125", "1,005", "900", "2m05s", "best.pt",
                                "finished"]
    assert run_row.split()[-7:] == ["-", "-", "1,005", "-", "1h02m*", "best.pt", "finished"]


def test_other_data_is_warned_about(tmp_path, capsys):
    base = write_run(tmp_path / "base", [(10, 1000, 3.0, None)],
                     data={"dataset": "a", "tokenizer": "char"})
    run = write_run(tmp_path / "run", [(10, 1000, 3.0, None)],
                    data={"dataset": "a", "tokenizer": "gpt2"})
    assert ("warning: run and base differ in data tokenizer (gpt2 vs char): their losses are not "
            "comparable" in compare_out(capsys, base, run))


def test_without_matplotlib_the_table_still_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare.plot, "draw", lambda *args, **kwargs: False)
    base = write_run(tmp_path / "base", [(10, 1000, 3.0, None)])
    lines = compare_out(capsys, base, write_run(tmp_path / "run", [(10, 1000, 3.0, None)]))
    assert (lines[1].startswith("base ")
            and lines[-1].startswith("matplotlib is not installed, so no "))


@pytest.mark.parametrize("make, message", [
    (lambda d: [d / "base"], "pass at least two run folders"),
    (lambda d: [], "pass at least two run folders"),
    (lambda d: [d / "base", d / "nowhere"], "has no run.json"),
    (lambda d: [d / "base", d / "empty"], "has no run.json"),
    (lambda d: [d / "base", d / "nolog"], "has no log.jsonl"),
    (lambda d: [d / "base", d / "base", "-o", str(d / "missing" / "c.png")], "does not exist"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, make, message):
    write_run(tmp_path / "base", [(10, 1000, 3.0, None)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "nolog").mkdir()
    (tmp_path / "nolog" / "run.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(a) for a in make(tmp_path)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    result = run_here("compare.py", [tmp_path], check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: pass at least two run folders: the base run first, then the "
                             "runs to compare with it\n")


def test_a_run_without_a_best_in_run_json_yet_takes_the_logs(tmp_path, capsys):
    base = write_run(tmp_path / "base", [(0, 0, 2.0, 0.01), (10, 1000, 3.0, 0.01),
                                         (20, 2000, 2.8, 0.01)])
    (base / "run.json").write_text(json.dumps({"best_val_loss": float("inf"),
                                               "end_reason": "running"}))
    run = write_run(tmp_path / "run", [(0, 0, 4.0, 0.01), (10, 1000, 2.7, 0.01)])
    # step 0 is not a candidate
    assert ("run vs base: better: best val 2.7000 vs 2.8000, difference -0.1000, noise threshold "
            "0.0283 (2 * sqrt(se_base^2 + se_run^2))") in compare_out(capsys, base, run)
