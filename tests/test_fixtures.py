"""The test play (tests/fixtures/play.txt) is what its generator writes, with tiny shakespeare's
65 characters."""

import runpy

from conftest import PLAY, ROOT


def test_play_is_what_make_play_writes():
    make_play = runpy.run_path(str(ROOT / "tests" / "fixtures" / "make_play.py"))
    text = PLAY.read_text()
    assert make_play["generate"]() == text  # regenerate: python tests/fixtures/make_play.py
    assert sorted(set(text)) == sorted(
        "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    assert 40_000 < len(text.encode()) < 60_000 and text.isascii()
