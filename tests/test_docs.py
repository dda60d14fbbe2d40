import re
import subprocess
import sys

import pytest
from conftest import ROOT

import configurator


@pytest.mark.slow
def test_the_config_reference_is_train_help():
    """docs/config.md's config block is `python train.py --help` verbatim, so the two never drift apart."""
    reference = (ROOT / "docs" / "config.md").read_text()
    block = re.search(r"`python train.py --help` prints:\n\n```\n(.*?)```", reference, re.DOTALL).group(1)
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    assert block == help_text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Install the test requirements and run the tests:\n\n```\n(.*?)\n```", readme).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path):
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation other than - and _ dropped,
    spaces made -."""
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
    """A whole-line comment right above a key heads its group in --help (`# ----` markers are not headings);
    the dataclasses' keys follow under their names."""
    keys = configurator.declared_keys(ROOT / "train.py")
    assert keys["out_dir"][3] == "the run and its data" and keys["batch_size"][3] == "batches"
    assert keys["block_size"][3] == "" and keys["learning_rate"][3].startswith("optimizer")
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    assert "\nbatches\n  --batch_size=16" in help_text and "\ndevices.RuntimeConfig\n  --device=auto" in help_text
