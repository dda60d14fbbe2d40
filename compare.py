"""Compare training runs: a table row per run folder, a verdict per run against the first, one plot.

    python compare.py out-base out-a out-b            # table and verdicts; writes compare.png
    python compare.py out-base out-a -o cmp.png

A lower best val loss is a better run only when the gap is larger than the noise of measuring the
loss on a finite set of val batches, so each verdict weighs the difference against the two runs'
standard errors (an eval line's val_loss_se). Runs that trained at different speeds or for different
budgets are also put side by side at one token count that every run reached, so an early lead is not
mistaken for a better recipe. Every field past the loss is optional (older runs, datasets without a
test split): a missing one shows as "-".
"""

import json
import math
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

import plot
from configurator import ArgumentParser

TASK_KEY = re.compile(r"(best_|final_)?task_")  # run.json's task_acc, best_task_acc_norm, ...
# runs that differ in any of these are not comparable
DATA_KEYS = ("dataset", "tokenizer", "vocab_size", "tokenizer_sha256", "source_sha256")


def fail(message):
    """Bad input: one line on stderr and exit status 2, as train.py and plot.py do; no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def number(x):
    """x if a finite number, else None (run.json writes an unset best val loss as Infinity)."""
    finite = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return x if finite else None


def load_run(folder, name):
    """What the table needs from a run folder: run.json's record and log.jsonl's eval and train
    lines (the last line for a step wins, as in plot.read_curves: after a resume it is what the run
    wrote going forward)."""
    folder = Path(folder)
    for needed in ("run.json", "log.jsonl"):
        if not (folder / needed).is_file():
            fail(f"{folder} has no {needed}: pass run folders written by train.py "
                 "(each holds run.json and log.jsonl)")
    try:
        record = json.loads((folder / "run.json").read_text())
        lines = plot.read_log(folder / "log.jsonl")
    except (OSError, ValueError) as e:
        fail(f"cannot read {folder}'s run.json or log.jsonl ({e})")
    if not isinstance(record, dict):
        fail(f"{folder / 'run.json'} is not a run record (a JSON object)")
    evals, train = {}, {}
    for line in lines:
        if not isinstance(line.get("step"), int) or number(line.get("tokens")) is None:
            continue  # an event, a sample or a skipped step: no loss at a token count
        if "val_loss" in line:
            evals[line["step"]] = line
        elif "train_loss" in line:
            train[line["step"]] = line
    evals = sorted(evals.values(), key=lambda e: e["tokens"])
    best_step, best = record.get("best_step"), number(record.get("best_val_loss"))
    candidates = [(e["val_loss"], e["step"]) for e in evals
                  if e["step"] > 0 and number(e["val_loss"]) is not None]
    if best is None and candidates:  # none in run.json yet: the log's after step 0, as in train.py
        best, best_step = min(candidates)
    best_line = next((e for e in evals if e["step"] == best_step), {})
    speeds = {key: [line[key] for line in train.values() if number(line.get(key)) is not None]
              for key in ("tok_per_sec", "wall_tok_per_sec")}
    return {"name": name, "log": folder / "log.jsonl", "record": record, "evals": evals,
            "best": best, "best_step": best_step, "best_se": number(best_line.get("val_loss_se")),
            "final": evals[-1]["val_loss"] if evals else number(record.get("final_val_loss")),
            "final_se": number(evals[-1].get("val_loss_se")) if evals else None,
            # medians: the first steps compile
            **{key: statistics.median(values) if values else None
               for key, values in speeds.items()}}


def val_at(evals, tokens):
    """The val loss at `tokens`, linear between the evaluations either side of it; else None."""
    below = [e for e in evals if e["tokens"] <= tokens]
    above = [e for e in evals if e["tokens"] >= tokens]
    if not below or not above:
        return None
    (t0, v0), (t1, v1) = ((e["tokens"], e["val_loss"]) for e in (below[-1], above[0]))
    return v0 if t1 == t0 else v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)


def train_time(record):
    """(seconds, exact): run.json's train_seconds, else ended - started, which also counts set-up,
    evaluation and any pause before a resume (the start is kept on resume): marked inexact."""
    if number(record.get("train_seconds")) is not None:
        return record["train_seconds"], True
    try:
        span = datetime.fromisoformat(record["ended"]) - datetime.fromisoformat(record["started"])
    except (KeyError, TypeError, ValueError):
        return None, True
    return span.total_seconds(), False


def fmt(x, se=None, spec=".4f"):
    if number(x) is None:
        return "-" if x is None else str(x)  # a name, or nan from a run that diverged
    text = f"{x:,}" if isinstance(x, int) else f"{x:{spec}}"
    return text + (f" ± {se:.4f}" if number(se) is not None else "")


def fmt_time(seconds, exact):
    if seconds is None:
        return "-"
    s = round(seconds)
    text = (f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600
            else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s")
    return text + ("" if exact else "*")


def verdict(base, run):
    """Is `run` better than `base` on best val loss? A difference counts when it exceeds twice the
    standard error of the difference, 2 * sqrt(se_base^2 + se_run^2); lower loss is better."""
    head = f"{run['name']} vs {base['name']}:"
    missing = [r["name"] for r in (base, run) if r["best"] is None]
    if missing:
        return (f"{head} unknown: no best val loss in {' or '.join(missing)} "
                "(no evaluation after step 0)")
    diff = run["best"] - base["best"]
    losses = f"best val {run['best']:.4f} vs {base['best']:.4f}, difference {diff:+.4f}"
    no_se = [r["name"] for r in (base, run) if r["best_se"] is None]
    if no_se:
        return f"{head} unknown: no standard error recorded ({', '.join(no_se)}); {losses}"
    threshold = 2 * math.hypot(base["best_se"], run["best_se"])
    word = "better" if diff < -threshold else "worse" if diff > threshold else "within noise"
    return (f"{head} {word}: {losses}, noise threshold {threshold:.4f} "
            "(2 * sqrt(se_base^2 + se_run^2))")


def table(runs):
    """The rows as text lines, with a footnote for the matched-token column and any inexact time."""
    reached = [r["evals"][-1]["tokens"] for r in runs if r["evals"]]
    matched = min(reached) if reached else None
    task_keys = sorted({k for r in runs for k in r["record"] if TASK_KEY.match(k)}) or ["task"]
    header = ["run", "best val", "step", "final val", f"val@{fmt(matched)} tok", "test", *task_keys,
              "tok/s", "wall tok/s", "time", "checkpoint", "end"]
    rows = [header]
    for r in runs:
        rec = r["record"]
        rows.append([r["name"], fmt(r["best"], r["best_se"]), fmt(r["best_step"]),
                     fmt(r["final"], r["final_se"]),
                     fmt(val_at(r["evals"], matched) if matched is not None else None),
                     fmt(rec.get("test_loss"), rec.get("test_loss_se")),
                     *(fmt(rec.get(k)) for k in task_keys),
                     fmt(r["tok_per_sec"], spec=",.0f"), fmt(r["wall_tok_per_sec"], spec=",.0f"),
                     fmt_time(*train_time(rec)), fmt(rec.get("selected_checkpoint")),
                     fmt(rec.get("end_reason"))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.append("val@N tok: val loss at the most tokens every run reached in an evaluation "
                 "(linear between a run's evaluations either side)")
    if any("*" in row[-3] for row in rows[1:]):
        lines.append("time*: from run.json's started to ended, so set-up, evaluation and pauses "
                     "before a resume count")
    return lines


def data_warnings(runs):
    """Losses measured on other data or in other tokens cannot be compared: say so, not judge."""
    base = runs[0]["record"].get("data") or {}
    for r in runs[1:]:
        data = r["record"].get("data") or {}
        for key in DATA_KEYS:
            if base.get(key) is not None and data.get(key) is not None and base[key] != data[key]:
                yield (f"warning: {r['name']} and {runs[0]['name']} differ in data {key} "
                       f"({data[key]} vs {base[key]}): their losses are not comparable")


def main(argv=None):
    parser = ArgumentParser(
        description="Compare training runs: a table, a verdict against the first run on best val "
                    "loss, and a plot of their loss curves.")
    parser.add_argument("runs", nargs="*", help="run folders (each with run.json and log.jsonl); "
                                                "the first is the base")
    parser.add_argument("-o", "--output", "--out", default="compare.png",
                        help="PNG to write (default: compare.png)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        fail("pass at least two run folders: the base run first, then the runs to compare with it")
    output = Path(args.output)
    if output.is_dir() or not output.parent.is_dir():
        fail(f"{output} is a folder or in a folder that does not exist; "
             "pass a file name such as compare.png to -o")
    names = [Path(p).resolve().name for p in args.runs]
    names = names if len(set(names)) == len(names) else args.runs  # names clash: the paths as given
    runs = [load_run(path, name) for path, name in zip(args.runs, names)]
    print("\n".join([*table(runs), "", *(verdict(runs[0], r) for r in runs[1:]),
                     *data_warnings(runs)]))
    try:
        drawn = plot.draw([r["log"] for r in runs], output, labels=names)
    except OSError as e:
        fail(f"cannot write {output} ({e.strerror or e}); pass another -o")
    print(f"wrote {output}" if drawn
          else f"matplotlib is not installed, so no {output}; `pip install matplotlib`")


if __name__ == "__main__":
    main()
