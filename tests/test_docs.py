import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_here

import configurator


def in_order(lines, within):
    """Whether `lines` all occur in `within`, in the same order (a subsequence), spacing aside (a
    longer key widens --help's column)."""
    remaining = iter([" ".join(line.split()) for line in within])
    return all(" ".join(line.split()) in remaining for line in lines)


@pytest.mark.slow
def test_the_config_reference_is_train_help():
    """docs/config.md's copy of `python train.py --help` holds no line that --help does not print,
    in its order: no stale default or meaning, while a key appended to the config block needs no
    edit here."""
    reference = (ROOT / "docs" / "config.md").read_text()
    block = re.search(r"`python train.py --help` printed:\n\n```\n(.*?)```", reference,
                      re.DOTALL).group(1)
    help_text = run_here("train.py", ["--help"]).stdout
    assert block.count("\n  --") >= 70  # the whole reference, not a fragment
    assert in_order(block.splitlines(), help_text.splitlines())


@pytest.mark.slow
def test_a_key_appended_to_the_config_block_needs_no_other_edit(tmp_path):
    """The "Add a config key" recipe's first step alone: --help lists the key under its group, the
    docs check still holds, a value outside its tag's range is refused in one line, and the resume
    check reads its class from the tag (a changeable key's change is accepted and said)."""
    source = (ROOT / "train.py").read_text()
    line = "sample_top_p = 1.0  # nucleus of the logged samples {(0, 1]; changeable}\n"
    anchor = "sample_top_k = 200"
    at = source.index("\n", source.index(anchor)) + 1
    copy = tmp_path / "train.py"
    copy.write_text(source[:at] + line + source[at:])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    help_text = run_here(copy, ["--help"]).stdout
    assert re.search(r"--sample_top_k=200 .*\n"
                     r"  --sample_top_p=1.0 +nucleus of the logged samples \{", help_text)
    reference = (ROOT / "docs" / "config.md").read_text()
    block = re.search(r"`python train.py --help` printed:\n\n```\n(.*?)```", reference,
                      re.DOTALL).group(1)
    assert in_order(block.splitlines(), help_text.splitlines())
    refused = run_here(copy, ["--sample_top_p=0"], check=False)
    assert (refused.returncode, refused.stderr) == (
        2, "error: sample_top_p must be in (0, 1], got 0.0\n")
    resumed = subprocess.run([sys.executable, "-c", RESUME_WITH_A_CHANGE, str(copy)], cwd=ROOT,
                             text=True, capture_output=True, check=True, env=env)
    assert resumed.stdout == "{'sample_top_p': [1.0, 0.5]}\n"


RESUME_WITH_A_CHANGE = """
import importlib.util, sys
import checks
spec = importlib.util.spec_from_file_location("train_copy", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
cfg = train.load_config(sys.argv[1], ["--sample_top_p=0.5"], *train.KEYS_FROM)
ckpt = {"path": "out/last.pt", "config": {**vars(cfg), "sample_top_p": 1.0}}
print(checks.resume_changes(cfg, ckpt, train.declared()))
"""


def test_in_order_accepts_an_added_line_and_refuses_a_changed_or_moved_one():
    help_lines = ["a", "  --x=1  meaning", "  --new=0  added", "  --y=2  other"]
    assert in_order(["a", "  --x=1  meaning", "  --y=2  other"], help_lines)
    assert not in_order(["a", "  --x=3  meaning", "  --y=2  other"], help_lines)
    assert not in_order(["a", "  --y=2  other", "  --x=1  meaning"], help_lines)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Install the test requirements and run the tests:\n\n```\n(.*?)\n```",
                        readme).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path):
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation other than - and
    _ dropped, spaces made -."""
    headings = re.findall(r"^#+ (.*)$", path.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto: are not checked offline
                continue
            path, _, anchor = target.partition("#")
            destination = (doc.parent / path).resolve() if path else doc
            if not destination.exists() or (anchor and anchor not in anchors(destination)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_readme_is_short_and_reaches_every_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(readme)}
    assert set(DOCS[1:]) <= linked


def test_help_shows_the_config_blocks_groups():
    """A whole-line comment right above a key heads its group in --help (`# ----` markers are not
    headings); the dataclasses' keys follow under their names."""
    keys = configurator.declared_keys(ROOT / "train.py")
    assert keys["out_dir"][3] == "the run and its data" and keys["batch_size"][3] == "batches"
    assert keys["block_size"][3] == "" and keys["learning_rate"][3].startswith("optimizer")
    help_text = run_here("train.py", ["--help"]).stdout
    assert ("\nbatches\n  --batch_size=16" in help_text
            and "\ndevices.RuntimeConfig\n  --device=auto" in help_text)
