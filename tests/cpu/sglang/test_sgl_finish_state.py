"""Patch 0011: a stop accepted in a speculative step that also reaches max_new_tokens ends the request
where decoding without speculation (one token per step) ends it.

Positions are 1-based output positions; ``finished_len`` is the output length through the stop.
"""

from __future__ import annotations

import random
from array import array
from typing import Any, Optional, Sequence

import pytest

pytestmark = pytest.mark.sglang
pytest.importorskip("sglang.srt")  # "sglang" alone would find this test dir

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

STOP_ID = 7
EOS_ID = 9
VOCAB_SIZE = 100
# Id i decodes to WORDS[i]; "STOP" spans the two tokens 3 ("S") and 4 ("TOP").
WORDS = ["a", "b", "c", "S", "TOP", "x", "y", "<stop>", "z", "<eos>"]


class WordTokenizer:
    """The part of a tokenizer ``Req`` and ``SamplingParams.normalize`` use: id ``i`` decodes to ``WORDS[i]``."""

    eos_token_id = None
    additional_stop_token_ids = None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(WORDS[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        while text:  # greedy longest match
            i = max((i for i, w in enumerate(WORDS) if text.startswith(w)), key=lambda i: len(WORDS[i]))
            ids.append(i)
            text = text[len(WORDS[i]):]
        return ids


def make_req(max_new_tokens: int, *, stop_str: Optional[str] = None, stop_regex: Optional[str] = None,
             stop_token: bool = True, eos: bool = True, ignore_eos: bool = False) -> Req:
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        stop=stop_str,
        stop_regex=stop_regex,
        stop_token_ids=[STOP_ID] if stop_token else None,
        ignore_eos=ignore_eos,
    )
    tokenizer = WordTokenizer() if (stop_str or stop_regex) else None
    params.normalize(tokenizer)
    req = Req("r0", "", array("i", [1, 2, 3]), params, eos_token_ids={EOS_ID} if eos else None,
              vocab_size=VOCAB_SIZE)
    req.tokenizer = tokenizer
    return req


def decode(req: Req, steps: Sequence[Sequence[int]]) -> tuple[dict[str, Any], Optional[int]]:
    """Feed verify steps (each: the tokens accepted in it) until finished -> (finish reason json, finished_len)."""
    for step in steps:
        req.output_ids.extend(step)
        req.update_finish_state(len(step))
        if req.finished():
            return req.finished_reason.to_json(), req.finished_len
    raise AssertionError(f"not finished after {steps}: output {list(req.output_ids)}")


def stop(matched: Any) -> dict[str, Any]:
    return {"type": "stop", "matched": matched}


def length(n: int) -> dict[str, Any]:
    return {"type": "length", "length": n}


def test_stop_token_inside_a_step_that_crosses_the_limit():
    req = make_req(5)
    # Positions 3..6 accepted at once; the stop token is at 4 < 5.
    assert decode(req, [[1, 2], [0, STOP_ID, 1, 2]]) == (stop(STOP_ID), 4)
    assert list(req.output_ids_through_stop) == [1, 2, 0, STOP_ID]


@pytest.mark.parametrize("position", [5, 6])
def test_stop_token_at_or_beyond_the_limit_is_length(position):
    """At position max_new_tokens the length check wins without speculation too (it runs first)."""
    step = [0, 1, 2, 0]
    step[position - 3] = STOP_ID
    req = make_req(5)
    assert decode(req, [[1, 2], step]) == (length(5), 5)
    assert list(req.output_ids_through_stop) == [1, 2] + step[:3]


def test_single_token_steps_unchanged():
    assert decode(make_req(5), [[t] for t in [1, 2, STOP_ID, 0, 0]]) == (stop(STOP_ID), 3)
    assert decode(make_req(5), [[t] for t in [1, 2, 0, 1, 2]]) == (length(5), 5)
    assert decode(make_req(5), [[t] for t in [1, 2, 0, 1, STOP_ID]]) == (length(5), 5)
    # An out-of-range id at the limit is left as it is (no stop check runs there).
    req = make_req(3)
    assert decode(req, [[1], [2], [VOCAB_SIZE + 5]]) == (length(3), 3)
    assert list(req.output_ids) == [1, 2, VOCAB_SIZE + 5]


def test_eos_inside_a_step_that_crosses_the_limit():
    assert decode(make_req(4, stop_token=False), [[1], [EOS_ID, 0, 1, 2]]) == (stop(EOS_ID), 2)
    assert decode(make_req(4, stop_token=False), [[1], [0, 1, 2, EOS_ID]]) == (length(4), 4)
    assert decode(make_req(4, ignore_eos=True), [[1], [EOS_ID, STOP_ID, 1, 2]]) == (length(4), 4)


def test_out_of_range_token_inside_a_step_that_crosses_the_limit():
    req = make_req(4)
    assert decode(req, [[1], [VOCAB_SIZE + 5, 0, 1, 2]]) == (stop("NaN happened"), 2)
    assert req.output_ids[1] == EOS_ID  # sanitized (the EOS id wins over the stop token id)
    assert decode(make_req(4), [[1], [0, 1, 2, VOCAB_SIZE + 5]]) == (length(4), 4)


def test_stop_string_inside_a_step_that_crosses_the_limit():
    # "S" at 3, "TOP" at 4: the stop string ends at 4 < 5.
    assert decode(make_req(5, stop_str="STOP"), [[0, 1], [3, 4, 0, 1]]) == (stop("STOP"), 4)
    # It ends at 5 = max_new_tokens: length, as without speculation.
    assert decode(make_req(5, stop_str="STOP"), [[0, 1], [0, 3, 4, 1]]) == (length(5), 5)
    assert decode(make_req(5, stop_regex="S.O"), [[0, 1], [3, 4, 0, 1]]) == ({"type": "stop", "matched": "S.O"}, 4)


def test_stop_string_beyond_the_limit_does_not_hide_an_earlier_stop_token():
    """The string check runs first; its match ending at 6 is undone, then the stop token at 3 counts."""
    assert decode(make_req(5, stop_str="STOP"), [[0, 1], [STOP_ID, 0, 3, 4]]) == (stop(STOP_ID), 3)


@pytest.mark.parametrize("use_str", [False, True], ids=["tokens", "stop_str"])
def test_speculative_steps_end_where_single_token_steps_end(use_str):
    """Random outputs split into random verify steps finish exactly like one token per step.

    Either stop token + EOS, or one stop string alone (mixing both has its own upstream ordering rule).
    """
    rng = random.Random(11)
    alphabet = [0, 1, 3, 4] if use_str else [0, 1, 2, STOP_ID, EOS_ID]
    kwargs = {"stop_str": "STOP", "stop_token": False, "eos": False} if use_str else {}
    for _ in range(300):
        max_new_tokens = rng.randint(1, 8)
        tokens = [rng.choice(alphabet) for _ in range(max_new_tokens + 4)]
        steps, i = [], 0
        while i < len(tokens):
            n = rng.randint(1, 5)
            steps.append(tokens[i:i + n])
            i += n
        expected = decode(make_req(max_new_tokens, **kwargs), [[t] for t in tokens])
        assert decode(make_req(max_new_tokens, **kwargs), steps) == expected, (max_new_tokens, steps)
