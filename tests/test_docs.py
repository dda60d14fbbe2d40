import re
import subprocess
import sys

from conftest import ROOT


def test_readme_config_reference_is_train_help():
    """The README's config block is `python train.py --help` verbatim, so the two never drift apart."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"`python train.py --help` prints:\n\n```\n(.*?)```", readme, re.DOTALL).group(1)
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    assert block == help_text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Install the test requirements and run the tests:\n\n```\n(.*?)\n```", readme).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()
