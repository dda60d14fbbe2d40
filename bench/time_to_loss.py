"""Time to a target val loss, recipes compared: `python bench/time_to_loss.py [--key=value ...]`.

Each recipe (a train.py config file and/or its own --key=value arguments, plus `shared_args`) trains
in turns of `turn_steps` steps: recipe A to step 200, recipe B to step 200, A to 400, and so on
(each turn a `train.py` process that pauses at `stop_iter` and resumes from last.pt, which continues
bitwise as if never stopped), so that other load on the machine falls on every recipe alike. A
recipe is done when it reaches the target (with `stop_at_target`; without it, an ablation, every
recipe trains its whole schedule) or its schedule ends. Reported per recipe, from its log.jsonl: the
step, tokens and training seconds (optimizer steps only: evaluation, samples, saves and process
start-up excluded) of its first evaluation at or below the target, the val loss at `val_at_steps`,
the median ms per step, and each figure's ratio to the first recipe's.
"""

import json
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for the project's modules

import torch

import plot
from bench import common
from configurator import ConfigError, run_main

ROOT = Path(__file__).resolve().parents[1]

# ---- config: defaults below; a config file, then --key=value, override them (see --help) ----
recipes = "config/shakespeare_char_cpu.py,config/speedrun_char_cpu.py"  # config and/or --key=value
target_val_loss = 1.88  # val loss every recipe trains to (same data, same fixed val batches) {> 0}
stop_at_target = True  # stop each recipe at the target; False runs every schedule out (an ablation)
val_at_steps = ""  # steps whose val loss the report lists, e.g. 1000,2000 (evaluated steps only)
turn_steps = 250  # steps each recipe trains per turn before the next recipe's turn {> 0}
shared_args = ""  # --key=value arguments for every recipe, e.g. "--data_root=data --dtype=float32"
out_root = "bench/results/time_to_loss"  # recipes' run folders: out_root/<config name>; must be new
out = "bench/results/time_to_loss.json"  # JSON report
# ---- end of config ----


def split_recipes(text):
    """The recipes in `recipes`: split at each comma that starts one (a config file or a --key), so
    that a value may hold commas (--lora_targets=attn,mlp)."""
    return [recipe.strip() for recipe in re.split(r",(?=\s*(?:--|[^\s,]+\.py(?:[\s,]|$)))", text)
            if recipe.strip()]


def recipe_parts(recipe):
    """(config file or None, the recipe's own --key=value arguments)."""
    parts = shlex.split(recipe)
    return (None, parts) if not parts or parts[0].startswith("--") else (parts[0], parts[1:])


def folder_name(recipe):
    """A recipe's run folder: the config's stem (or train) + its own arguments without dashes."""
    config, args = recipe_parts(recipe)
    return "+".join([Path(config).stem if config else "train",
                     *(arg.lstrip("-").replace("/", "_") for arg in args)])


def train_turn(recipe, out_dir, stop_step, extra):
    """A recipe's turn: train.py to stop_step (resuming after the first turn). Returns run.json."""
    resume = ["--init_from=resume"] if (out_dir / "last.pt").exists() else []
    config, own = recipe_parts(recipe)
    command = [sys.executable, "train.py", *([config] if config else []), *extra, *own,
               f"--out_dir={out_dir}", f"--stop_iter={stop_step}", *resume]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise ConfigError(f"{shlex.join(command[1:])} failed: "
                          f"{result.stderr.strip().splitlines()[-1]}")
    return json.loads((out_dir / "run.json").read_text())


def summary(recipe, out_dir, record, target, val_steps):
    """The recipe's figures at its first evaluation at or below the target (or at its end, if it
    never got there)."""
    log = plot.read_log(out_dir / "log.jsonl")
    step_ms = [line["dt_ms"] for line in log if "dt_ms" in line]
    # a resumed turn's repeat keeps the last
    evals = {line["step"]: line for line in log if "val_loss" in line}
    at_target = next((line for step, line in sorted(evals.items())
                      if step and line["val_loss"] <= target), None)
    end = at_target or {"step": record["step"], "tokens": record["tokens_seen"],
                        "train_seconds": record["train_seconds"]}
    return {"recipe": recipe, "reached": at_target is not None, "end_reason": record["end_reason"],
            "best_val_loss": record["best_val_loss"], "steps": end["step"], "tokens": end["tokens"],
            "train_seconds": end["train_seconds"],
            "ms_per_step": statistics.median(step_ms) if step_ms else None,
            "val_at": {step: evals[step]["val_loss"] if step in evals else None
                       for step in val_steps}, "out_dir": str(out_dir)}


def benchmark(cfg):
    names = split_recipes(cfg.recipes)
    if len(names) < 2:
        raise ConfigError("give two or more --recipes")
    try:
        val_steps = [int(step) for step in cfg.val_at_steps.split(",") if step]
    except ValueError:
        raise ConfigError("val_at_steps must be steps separated by commas, "
                          f"got {cfg.val_at_steps!r}") from None
    for recipe in names:
        config, _ = recipe_parts(recipe)
        if config and not (ROOT / config).is_file():
            raise ConfigError(f"recipe {recipe} starts with {config}, which is not a file; "
                              f"give train.py config files relative to {ROOT}, "
                              "each maybe followed by --key=value arguments")
    folders = {recipe: Path(cfg.out_root).resolve() / folder_name(recipe) for recipe in names}
    if len(set(folders.values())) < len(names):
        raise ConfigError("two recipes are the same; give each recipe once")
    if Path(cfg.out_root).exists():
        raise ConfigError(f"{cfg.out_root} already exists; remove it or give another --out_root")
    extra = [*shlex.split(cfg.shared_args),
             f"--target_val_loss={cfg.target_val_loss if cfg.stop_at_target else 0}"]
    records, turn = {}, 0
    while (len(records) < len(names)
           or any(r["end_reason"].startswith("paused") for r in records.values())):
        turn += 1
        for recipe in names:
            if recipe not in records or records[recipe]["end_reason"].startswith("paused"):
                records[recipe] = train_turn(recipe, folders[recipe], turn * cfg.turn_steps, extra)
        progress = ", ".join(f"{folders[r].name} step {records[r]['step']}" for r in names)
        print(f"turn {turn}: {progress}", flush=True)
    results = [summary(recipe, folders[recipe], records[recipe], cfg.target_val_loss, val_steps)
               for recipe in names]
    base = results[0]
    for result in results:
        for key in ("steps", "tokens", "train_seconds", "ms_per_step"):
            result[f"{key}_ratio"] = (result[key] / base[key]
                                      if base[key] and result[key] is not None else None)
    print(f"\nto val <= {cfg.target_val_loss}:")
    header = ("reached", "steps", "tokens", "train s", "ms/step", "time ratio",
              *(f"val@{s}" for s in val_steps))
    widths = (7, 6, 11, 8, 8, 10, *(9 for _ in val_steps))
    print(f"{'recipe':48s} "
          + " ".join(f"{title:>{width}s}" for title, width in zip(header, widths)))
    for r in results:
        vals = "".join(f" {'-' if v is None else f'{v:.4f}':>9s}" for v in r["val_at"].values())
        print(f"{folders[r['recipe']].name:48s} {'yes' if r['reached'] else 'no':>7s} "
              f"{r['steps']:6d} {r['tokens']:11,d} {r['train_seconds']:8.1f} "
              f"{r['ms_per_step']:8.1f} {r['train_seconds_ratio']:10.3f}" + vals)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {**common.machine_record(device), "config": vars(cfg), "results": results}
    common.write_report(cfg.out, report)
    return report


if __name__ == "__main__":
    run_main(benchmark, __file__, None)
