"""sample.py for people (issue 25): text streamed as it is sampled, stop strings, and --chat in the
template prepare.py sft renders, the conversation kept in one KV cache."""

import io

import pytest
import torch
from conftest import run_here

import data
import preparation.sft
import sample
from engine import Session, Streamer, stream
from model import GPT, GPTConfig

CONFIG = GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32)
META = {"tokenizer": "byte", "vocab_size": 257, "dataset": "sft", "format": "sft",
        "template": data.SFT_TEMPLATE}


def model(pos_embedding="rope"):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CONFIG.__dict__, "pos_embedding": pos_embedding})).eval()


@pytest.mark.parametrize("pos_embedding", ["rope", "learned"])
def test_a_session_samples_the_tokens_model_generate_does(pos_embedding):
    gpt, prompt = model(pos_embedding), [256, 72, 105]
    expected = gpt.generate(torch.tensor([prompt]), 20, temperature=0)[0, len(prompt):].tolist()
    session = Session(gpt, "cpu")
    session.feed(prompt[:1])
    session.feed(prompt[1:])  # fed in two calls: the cache carries the first
    tokens = []
    for _ in range(20):
        tokens.append(int(session.logits.argmax()))
        session.feed(tokens[-1:])
    assert tokens == expected


def test_a_full_session_starts_again_from_its_last_half_context():
    gpt, session = model(), Session(model(), "cpu")
    session.feed(list(range(40)))  # past the 32-token context: the last 16 are prefilled
    with torch.no_grad():
        expected = gpt(torch.tensor([list(range(24, 40))]))[0][0, -1]
    assert session.cache.pos == 16 and torch.allclose(session.logits, expected, atol=1e-5)


def streamed(tokens, stops):
    shown = []
    streamer = Streamer(data.ByteTokenizer(), stops, shown.append)
    for token in tokens:
        if streamer.add(token):
            return shown
    streamer.finish()
    return shown


def test_the_streamer_holds_back_what_may_open_a_stop_string_and_cuts_at_it():
    # "\n" waited: it may have opened "\nEND"
    assert streamed(list(b"ab\nc"), ["\nEND"]) == ["a", "b", "\nc"]
    assert "".join(streamed(list(b"one\nEND two"), ["\nEND", "zz"])) == "one"
    assert streamed(list("é!".encode()), []) == ["é", "!"]  # é's first byte is no character yet


def test_stream_ends_at_the_end_of_text_token_which_is_fed_but_not_shown():
    session = Session(model(), "cpu")
    session.feed([256, 65])
    eot = int(session.logits.argmax())  # greedy sampling's first token, here taken as end of text
    streamer = Streamer(data.ByteTokenizer(), [], lambda text: None)
    assert stream(session, streamer, (0.0, None, None, 257, None), 10, eot_id=eot) == ""
    assert session.ids == [256, 65, eot]


def test_chat_feeds_the_conversation_in_the_sft_template(monkeypatch, capsys):
    """Two turns read from stdin; the session's tokens are, turn for turn, what prepare.py sft
    renders for the same conversation (the replies as the model gave them)."""
    monkeypatch.setattr(sample, "load_model", lambda cfg: (model(), META))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nwho?\n"))
    session = sample.main(["--chat", "--temperature=0", "--max_new_tokens=6", "--device=cpu"])
    out = capsys.readouterr().out
    assert out.startswith("> hi\n") and "\n> who?\n" in out
    replies = [line for line in out.splitlines() if not line.startswith("> ")]
    record = {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": replies[0]},
                           {"role": "user", "content": "who?"},
                           {"role": "assistant", "content": replies[1]}]}
    ids, _ = data.render_sft(preparation.sft._pieces(record, "test"), data.ByteTokenizer())
    assert session.ids == ids


def test_chat_refuses_a_model_not_fine_tuned_in_the_template(monkeypatch, capsys):
    monkeypatch.setattr(sample, "load_model",
                        lambda cfg: (model(), {**META, "format": None, "template": None,
                                               "dataset": "python_stdlib"}))
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--chat", "--device=cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "trained on python_stdlib, not on data in it" in err


@pytest.mark.slow
def test_sample_streams_and_stops_at_a_stop_string(tmp_path):
    torch.save({"model": model().state_dict(), "model_config": CONFIG.__dict__,
                "meta": {**META, "format": None}, "config": {}, "step": 0}, tmp_path / "best.pt")
    args = [f"--out_dir={tmp_path}", "--num_samples=1", "--max_new_tokens=40", "--temperature=0",
            "--device=cpu"]
    whole = run_here("sample.py",
                     [*args, "--stop_at_eot=False"]).stdout.split("\n---------------")[0]
    stop = whole[5:7]
    cut = run_here("sample.py", [*args, "--stop_at_eot=False", f"--stop={stop}"]).stdout
    assert cut == whole[:whole.index(stop)] + "\n---------------\n"
