"""`RowOutput`, the generation semantics the engine and `Hub.generate` share: stop strings
found across token boundaries and held back until they cannot be one, `min_tokens`, the
end of sequence, logprobs."""

from __future__ import annotations

import torch
from conftest import char_tokenizer

from lorahub.decoding import RowOutput, Sampling, settled

TOK = char_tokenizer()
EOS = {TOK.eos_token_id}


def forced(text: str) -> list[torch.Tensor]:
    """Logits that make greedy decoding spell `text`, one character a step."""
    out = []
    for ch in text:
        logits = torch.zeros(len(TOK))
        logits[TOK.convert_tokens_to_ids(ch)] = 10.0
        out.append(logits)
    return out


def run(row: RowOutput, text: str) -> tuple[str, str | None, int]:
    shown, finish, steps = "", None, 0
    for logits in forced(text):
        step = row.push(logits)
        shown += step.text
        steps += 1
        if step.finish:
            finish = step.finish
            break
    return shown, finish, steps


def test_a_stop_string_across_tokens_ends_the_text_before_it() -> None:
    row = RowOutput(TOK, Sampling(100, stop=("END",)), EOS, None)
    shown, finish, steps = run(row, "x" * 60 + "abcEND tail")
    assert (shown, finish) == ("x" * 60 + "abc", "stop")
    assert steps == 66  # stopped at the D, not later


def test_a_possible_stop_prefix_is_held_back_until_it_is_not_one() -> None:
    row = RowOutput(TOK, Sampling(100, stop=("ENDS",)), EOS, None)
    texts = [row.push(logits).text for logits in forced("abEND!")]
    assert texts == ["a", "b", "", "", "", "END!"]


def test_min_tokens_holds_the_end_of_sequence_back() -> None:
    eos = torch.zeros(len(TOK))
    eos[TOK.eos_token_id] = 10.0
    row = RowOutput(TOK, Sampling(10, min_new_tokens=3), EOS, None)
    steps = [row.push(eos.clone()) for _ in range(4)]
    assert [s.finish for s in steps] == [None, None, None, "stop"]
    assert TOK.eos_token_id not in row.ids[:3]


def test_length_and_logprobs() -> None:
    row = RowOutput(TOK, Sampling(3), EOS, logprobs=2)
    steps = [row.push(logits) for logits in forced("abc")]
    assert [s.finish for s in steps] == [None, None, "length"]
    top = steps[0].logprobs[0]
    assert top["token"] == "a" and len(top["top_logprobs"]) == 2
    assert top["logprob"] == top["top_logprobs"][0]["logprob"]


def test_settled_holds_only_a_real_prefix_of_a_stop() -> None:
    assert settled("hello wor", ("world",)) == "hello "
    assert settled("hello", ("xyz",)) == "hello"
    assert settled("ab\ufffd", ()) == "ab"
    assert settled("a" * 10, ("b" * 200_000,)) == "a" * 10  # cost bounded by the text


def test_a_token_that_is_part_of_a_character_keeps_its_bytes() -> None:
    """Byte-level BPE with no merges: one token a byte. An emoji's tokens decode to U+FFFD
    each; their bytes, joined, are the emoji's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lorahub.decoding import token_bytes

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = tok("🍕 ok")["input_ids"]
    assert len(ids) == 7 and tok.decode(ids[:1]) == "\ufffd"
    assert b"".join(bytes(token_bytes(tok, i)) for i in ids) == "🍕 ok".encode()
    chars = char_tokenizer()  # not byte-level: the bytes of the token's text
    assert token_bytes(chars, chars.convert_tokens_to_ids("~")) == [126]
