"""Unit tests of the incremental detokenizer: UTF-8 split across pieces, and stop strings held back and cut."""

from __future__ import annotations

import random

import pytest

from llamaserve.engine.detokenizer import Detokenizer

REPLACEMENT = "\ufffd"


def run(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[Detokenizer, list[str]]:
    """Feed every piece (until a stop), then flush; returns the detokenizer and each released delta."""
    detok = Detokenizer(stop)
    deltas = []
    for p in pieces:
        deltas.append(detok.feed(p))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return detok, deltas


def byte_pieces(text: str) -> list[bytes]:
    return [bytes([b]) for b in text.encode()]


def split_randomly(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 8)))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def expected_cut(text: str, stop: tuple[str, ...]) -> str:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


# --- UTF-8 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("char", ["é", "€", "漢", "😀"])
def test_utf8_character_split_into_single_bytes(char: str) -> None:
    detok = Detokenizer()
    data = char.encode()
    deltas = [detok.feed(data[i : i + 1]) for i in range(len(data))]
    assert deltas[:-1] == [""] * (len(data) - 1)
    assert deltas[-1] == char
    assert detok.flush() == ""
    assert detok.text == char


def test_utf8_mixed_text_byte_by_byte_never_yields_replacement() -> None:
    text = "Café — naïve 漢字 😀 done"
    detok, deltas = run(byte_pieces(text))
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == text == detok.text


def test_utf8_split_with_stop_strings() -> None:
    text = "prix: 5€, café"
    detok, deltas = run(byte_pieces(text), stop=("€,",))
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == "prix: 5"
    assert detok.stopped


def test_invalid_bytes_become_replacement_characters() -> None:
    detok, deltas = run([b"ok\xff", b"!"])
    assert "".join(deltas) == f"ok{REPLACEMENT}!"


def test_truncated_character_at_flush_becomes_replacement() -> None:
    detok = Detokenizer()
    assert detok.feed(b"a" + "é".encode()[:1]) == "a"
    assert detok.flush() == REPLACEMENT


def test_without_stop_text_is_released_at_once() -> None:
    detok = Detokenizer()
    assert detok.feed(b"Hello") == "Hello"
    assert detok.feed(b" wor") == " wor"
    assert detok.flush() == ""
    assert detok.text == "Hello wor"
    assert not detok.stopped


# --- stop strings ---------------------------------------------------------------------------------------------
def test_stop_across_pieces_is_cut_and_never_released() -> None:
    stop = "</end>"
    pieces = [b"The answer", b" is 42.<", b"/e", b"nd", b">trailing text"]
    detok, deltas = run(pieces, stop=(stop,))
    assert detok.stopped
    released = "".join(deltas)
    assert released == "The answer is 42."
    assert detok.text == released
    for d in deltas:  # not the stop string, nor any part of it
        assert not any(ch in d for ch in "</>"), deltas
    assert deltas[-1] == ""  # flush after the stop releases nothing


def test_stop_string_prefix_is_held_until_settled() -> None:
    detok = Detokenizer(("STOP",))
    assert detok.feed(b"go S") == "go "
    assert detok.feed(b"T") == ""
    assert detok.feed(b"O") == ""
    assert detok.feed(b"P now") == ""
    assert detok.stopped
    assert detok.text == "go "


def test_stop_inside_one_piece() -> None:
    detok = Detokenizer(("\n\n",))
    assert detok.feed(b"line one\n\nline two") == "line one"
    assert detok.stopped


def test_stop_at_the_very_start() -> None:
    detok, deltas = run([b"STO", b"Pxyz"], stop=("STOP",))
    assert detok.stopped
    assert "".join(deltas) == ""


def test_partial_prefix_that_diverges_is_released() -> None:
    detok = Detokenizer(("world!",))
    assert detok.feed(b"Hello wor") == "Hello "
    assert detok.feed(b"d") == "word"
    assert not detok.stopped


def test_partial_prefix_never_completed_is_released_at_flush() -> None:
    detok = Detokenizer(("world!",))
    assert detok.feed(b"Hello ") == "Hello "
    assert detok.feed(b"world") == ""
    assert detok.flush() == "world"
    assert detok.text == "Hello world"
    assert not detok.stopped


def test_multiple_stops_earliest_wins() -> None:
    for stop in [("END", "STOP"), ("STOP", "END")]:
        detok = Detokenizer(stop)
        assert detok.feed(b"a STOP b END c") == "a "
        assert detok.stopped


def test_multiple_stops_first_to_complete_wins_across_pieces() -> None:
    detok, deltas = run([b"x <", b"!-", b"- ###", b" -->"], stop=("-->", "###"))
    assert "".join(deltas) == "x <!-- "
    assert detok.stopped


def test_prefix_of_one_stop_held_while_another_stop_completes() -> None:
    # "ab" could still start "abcd" when "b!" completes: the cut is where "b!" begins
    detok, deltas = run([b"xa", b"b", b"!"], stop=("abcd", "b!"))
    assert "".join(deltas) == "xa"
    assert detok.stopped


def test_empty_stop_strings_are_ignored() -> None:
    detok, deltas = run([b"abc"], stop=("",))
    assert "".join(deltas) == "abc"
    assert not detok.stopped


def test_random_splits_match_the_reference() -> None:
    """Arbitrary byte splits (also inside UTF-8 characters) release exactly the text before the first stop."""
    rng = random.Random(1234)
    stops = ("<|é|>", "STOP")  # no shared characters: occurrences cannot overlap
    alphabet = ["a", "b", " ", "é", "漢", "😀", "<", "|", ">", "S", "T", "O", "P", "<|é", "ST", "STO"]
    for _ in range(500):
        words = [rng.choice(alphabet) for _ in range(rng.randint(0, 12))]
        if rng.random() < 0.5:
            words.insert(rng.randint(0, len(words)), rng.choice(stops))
        text = "".join(words)
        detok, deltas = run(split_randomly(text.encode(), rng), stop=stops)
        released = "".join(deltas)
        expected = expected_cut(text, stops)
        assert released == expected, (text, deltas)
        assert detok.stopped == (expected != text)
        assert all(REPLACEMENT not in d for d in deltas), deltas
        if detok.stopped:
            assert all(s not in released for s in stops)
