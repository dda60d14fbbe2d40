"""Plot train and val loss against tokens from one or more runs' log.jsonl (matplotlib, optional).

    python plot.py out/log.jsonl                              # writes out/loss.png
    python plot.py out-a/log.jsonl out-b/log.jsonl -o cmp.png # several runs on one plot

After a crash and resume, the steps between the last checkpoint and the crash appear twice in
log.jsonl; the last line for each (kind, step) wins, which is what a resumed run wrote on its way
forward. A line that does not parse (one a crash or a full disk cut short) is skipped: read_log,
also runlog.read_log.
"""

import json
import sys
from pathlib import Path

from configurator import ArgumentParser

MISSING_MATPLOTLIB = ("matplotlib is not installed, so no loss.png; "
                      "`pip install matplotlib` to get it")


def parse_record(line):
    """One log line's record, or None where it is not a whole JSON object (a torn last line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_log(path):
    """log.jsonl's records in order, skipping lines that do not parse: what a crash or a full disk
    left behind must never stop a reader (a resumed run sets such a line aside, but older logs may
    still hold one)."""
    lines = Path(path).read_text(errors="replace").splitlines()
    return [record for record in map(parse_record, lines) if record is not None]


def read_curves(log_path):
    """{'train': [(tokens, loss)], 'val': [(tokens, loss)], 'task': [(tokens, acc_norm)]} from a
    log, one point per step (the last wins)."""
    curves = {"train": {}, "val": {}, "task": {}}
    for record in read_log(log_path):
        if "val_loss" in record:
            curves["val"][record["step"]] = (record["tokens"], record["val_loss"])
        elif "train_loss" in record:
            curves["train"][record["step"]] = (record["tokens"], record["train_loss"])
        elif "task_acc_norm" in record:
            curves["task"][record["step"]] = (record["tokens"], record["task_acc_norm"])
    return {kind: [points[s] for s in sorted(points)] for kind, points in curves.items()}


def draw(log_paths, png_path, labels=None):
    """Write a loss plot of the logs to png_path; False (and nothing written) without matplotlib."""
    try:
        import matplotlib  # optional dependency, only needed here

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = [(labels[i] if labels else Path(path).parent.name, read_curves(path))
            for i, path in enumerate(log_paths)]
    with_task = any(curves["task"] for _, curves in runs)  # task_eval's accuracy: its own panel
    fig, axes = plt.subplots(2 if with_task else 1, 1, figsize=(8, 8 if with_task else 5),
                             squeeze=False, sharex=True)
    ax = axes[0][0]
    tmp = Path(png_path).with_name(f".{Path(png_path).name}.tmp.png")
    try:  # a training run draws at every evaluation: a failed draw must not leave its figure open
        for i, (label, curves) in enumerate(runs):
            for split, style in (("train", "-"), ("val", "o-")):
                if curves[split]:
                    tokens, losses = zip(*curves[split])
                    ax.plot(tokens, losses, style, color=f"C{i}",
                            alpha=0.5 if split == "train" else 1.0, markersize=3,
                            label=f"{label} {split}")
            if curves["task"]:
                tokens, accuracy = zip(*curves["task"])
                axes[1][0].plot(tokens, accuracy, "o-", color=f"C{i}", markersize=3,
                                label=f"{label} acc_norm")
        ax.set_ylabel("loss (nats/token)")
        for panel in [row[0] for row in axes]:
            panel.grid(alpha=0.3)
            panel.legend()
        if with_task:
            axes[1][0].set_ylabel("task accuracy (acc_norm)")
        axes[-1][0].set_xlabel("tokens")
        fig.tight_layout()
        fig.savefig(tmp, dpi=100)
        tmp.replace(png_path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return True


def fail(message):
    """Bad input: one line on stderr and exit status 2, as train.py does; no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_log(path):
    path = Path(path)
    if path.is_dir():
        fail(f"{path} is a folder; pass the log.jsonl in it ({path / 'log.jsonl'})")
    try:
        curves = read_curves(path)
    except OSError as e:
        fail(f"cannot read {path} ({e.strerror or e}); pass the log.jsonl of a run folder")
    if not curves["train"] and not curves["val"]:
        fail(f"{path} has no train_loss or val_loss lines: not a training log, or a run that had "
             "not yet logged")


def main(argv=None):
    parser = ArgumentParser(
        description="Plot train and val loss against tokens from log.jsonl files.")
    parser.add_argument("logs", nargs="+", help="log.jsonl files of one or more runs")
    parser.add_argument("-o", "--output",
                        help="PNG to write (default: loss.png beside the first log)")
    args = parser.parse_args(argv)
    for log in args.logs:
        check_log(log)
    output = Path(args.output or Path(args.logs[0]).with_name("loss.png"))
    if not output.parent.is_dir():
        fail(f"{output.parent} does not exist; create it or pass another -o")
    if output.is_dir():
        fail(f"{output} is a folder; pass a file name such as {output / 'loss.png'}")
    try:
        if not draw(args.logs, output):
            sys.exit(f"error: {MISSING_MATPLOTLIB}")
    except OSError as e:
        fail(f"cannot write {output} ({e.strerror or e}); pass another -o")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
