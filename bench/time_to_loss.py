"""Time to a target validation loss, recipes side by side: `python bench/time_to_loss.py [--key=value ...]`.

Each recipe (a train.py config file, plus `shared_args`) trains with `target_val_loss` set, in turns of
`turn_steps` steps: recipe A to step 200, recipe B to step 200, A to 400, and so on (each turn a `train.py`
process that pauses at `stop_iter` and resumes from last.pt, which continues bitwise as if never stopped),
so that other load on the machine falls on every recipe alike. A recipe is done when it reaches the target
or its schedule ends. Reported per recipe, from its run.json and log.jsonl: the step, tokens and training
seconds (optimizer steps only: evaluation, samples, saves and process start-up excluded) at which it
reached the target, the median ms per step, and each figure's ratio to the first recipe's.
"""

import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for the project's modules

import torch

import plot
from bench import common
from configurator import ConfigError, run_main

ROOT = Path(__file__).resolve().parents[1]

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
recipes = "config/shakespeare_char_cpu.py,config/speedrun_char_cpu.py"  # train.py config files, the first the baseline
target_val_loss = 1.88  # the validation loss every recipe trains to (on the same data and fixed val batches)
turn_steps = 250  # steps each recipe trains per turn before the next recipe's turn
shared_args = ""  # --key=value arguments given to every recipe, e.g. "--data_root=data --dtype=float32"
out_root = "bench/results/time_to_loss"  # the recipes' run folders go here (out_root/<config name>); must be new
out = "bench/results/time_to_loss.json"  # JSON report
# ---- end of config ----


def train_turn(recipe, out_dir, stop_step, extra):
    """One turn of a recipe: train.py up to stop_step (resuming after the first turn). Returns run.json."""
    resume = ["--init_from=resume"] if (out_dir / "last.pt").exists() else []
    command = [sys.executable, "train.py", recipe, *extra, f"--out_dir={out_dir}", f"--stop_iter={stop_step}",
               *resume]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise ConfigError(f"{shlex.join(command[1:])} failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads((out_dir / "run.json").read_text())


def summary(recipe, out_dir, record):
    """The recipe's figures at the target (or at its end, if it never got there)."""
    steps = [line["dt_ms"] for line in plot.read_log(out_dir / "log.jsonl") if "dt_ms" in line]
    reached = record.get("target_step") is not None
    return {"recipe": recipe, "reached": reached, "end_reason": record["end_reason"],
            "best_val_loss": record["best_val_loss"],
            "steps": record["target_step"] if reached else record["step"],
            "tokens": record["target_tokens"] if reached else record["tokens_seen"],
            "train_seconds": record["target_train_seconds"] if reached else record["train_seconds"],
            "ms_per_step": statistics.median(steps) if steps else None, "out_dir": str(out_dir)}


def benchmark(cfg):
    names = [r for r in cfg.recipes.split(",") if r]
    if len(names) < 2 or cfg.target_val_loss <= 0 or cfg.turn_steps <= 0:
        raise ConfigError("give two or more --recipes, a positive --target_val_loss and positive --turn_steps")
    for recipe in names:
        if not (ROOT / recipe).is_file():
            raise ConfigError(f"recipe {recipe} does not exist; give train.py config files relative to {ROOT}")
    if Path(cfg.out_root).exists():
        raise ConfigError(f"{cfg.out_root} already exists; remove it or give another --out_root")
    extra = [*shlex.split(cfg.shared_args), f"--target_val_loss={cfg.target_val_loss}"]
    folders = {recipe: Path(cfg.out_root).resolve() / Path(recipe).stem for recipe in names}
    records, turn = {}, 0
    while len(records) < len(names) or any(r["end_reason"].startswith("paused") for r in records.values()):
        turn += 1
        for recipe in names:
            if recipe not in records or records[recipe]["end_reason"].startswith("paused"):
                records[recipe] = train_turn(recipe, folders[recipe], turn * cfg.turn_steps, extra)
        print(f"turn {turn}: " + ", ".join(f"{Path(r).stem} step {records[r]['step']}" for r in names), flush=True)
    results = [summary(recipe, folders[recipe], records[recipe]) for recipe in names]
    base = results[0]
    for result in results:
        for key in ("steps", "tokens", "train_seconds", "ms_per_step"):
            result[f"{key}_ratio"] = result[key] / base[key] if base[key] and result[key] is not None else None
    print(f"\nto val <= {cfg.target_val_loss}:")
    header = ("reached", "steps", "tokens", "train s", "ms/step", "time ratio")
    print(f"{'recipe':32s} " + " ".join(f"{title:>{width}s}" for title, width in zip(header, (7, 6, 11, 8, 8, 10))))
    for r in results:
        print(f"{r['recipe']:32s} {'yes' if r['reached'] else 'no':>7s} {r['steps']:6d} {r['tokens']:11,d} "
              f"{r['train_seconds']:8.1f} {r['ms_per_step']:8.1f} {r['train_seconds_ratio']:10.3f}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {**common.machine_record(device), "target_val_loss": cfg.target_val_loss, "turn_steps": cfg.turn_steps,
              "shared_args": cfg.shared_args, "results": results}
    common.write_report(cfg.out, report)
    return report


if __name__ == "__main__":
    run_main(benchmark, __file__, None)
