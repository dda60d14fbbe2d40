"""Plot train and val loss against tokens from one or more runs' log.jsonl (matplotlib, optional).

    python plot.py out/log.jsonl                              # writes out/loss.png
    python plot.py out-a/log.jsonl out-b/log.jsonl -o cmp.png # several runs on one plot

After a crash and resume, the steps between the last checkpoint and the crash appear twice in log.jsonl;
the last line for each (kind, step) wins, which is what a resumed run wrote on its way forward.
"""

import argparse
import json
import sys
from pathlib import Path

MISSING_MATPLOTLIB = "matplotlib is not installed, so no loss.png; `pip install matplotlib` to get it"


def read_curves(log_path):
    """{'train': [(tokens, loss)], 'val': [(tokens, loss)]} from a log, one point per step (the last wins)."""
    train, val = {}, {}
    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            val[record["step"]] = (record["tokens"], record["val_loss"])
        elif "train_loss" in record:
            train[record["step"]] = (record["tokens"], record["train_loss"])
    return {"train": [train[s] for s in sorted(train)], "val": [val[s] for s in sorted(val)]}


def draw(log_paths, png_path, labels=None):
    """Write a loss plot of the given logs to png_path; False (and nothing written) without matplotlib."""
    try:
        import matplotlib  # optional dependency, only needed here

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, path in enumerate(log_paths):
        label = labels[i] if labels else Path(path).parent.name
        curves = read_curves(path)
        for split, style in (("train", "-"), ("val", "o-")):
            if curves[split]:
                tokens, losses = zip(*curves[split])
                ax.plot(tokens, losses, style, color=f"C{i}", alpha=0.5 if split == "train" else 1.0,
                        markersize=3, label=f"{label} {split}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_name(f".{Path(png_path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot train and val loss against tokens from log.jsonl files.")
    parser.add_argument("logs", nargs="+", help="log.jsonl files of one or more runs")
    parser.add_argument("-o", "--output", help="PNG to write (default: loss.png beside the first log)")
    args = parser.parse_args(argv)
    missing = [log for log in args.logs if not Path(log).is_file()]
    if missing:
        sys.exit(f"error: {missing[0]} does not exist; pass the log.jsonl of a run folder")
    output = args.output or str(Path(args.logs[0]).with_name("loss.png"))
    if not draw(args.logs, output):
        sys.exit(f"error: {MISSING_MATPLOTLIB}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
