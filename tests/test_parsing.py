"""The tolerant output parser: reference behaviour, adversarial input, linear time."""

import random
import time

import pytest
from hypothesis import given, settings, strategies as st

from finers_rt.parsing import ParsedOutput, first_flat_object, parse_output, says_not_found


def test_gse_answer():
    out = parse_output("<think> the pen is left </think><answer>{'bbox': [100, 200, 356, 456], "
                       "'response': 'The object is found.'}</answer>")
    assert out.bbox_xyxy == (100, 200, 356, 456)
    assert out.points_xy is None
    assert out.response == "The object is found."
    assert out.think == " the pen is left "


def test_lpr_answer_with_unquoted_response_key_like_the_reference_example():
    out = parse_output("<answer>{'bbox': [10,100,200,210], 'points_1': [30,110], "
                       "'points_2': [35,180], response: 'The object is found.'}</answer>")
    assert out.bbox_xyxy == (10, 100, 200, 210)
    assert out.points_xy == ((30, 110), (35, 180))
    assert out.response == "The object is found."


def test_json_and_bracket_quote_fix():
    out = parse_output('{"bbox": [1, 2, 3, 4]", "response": "red"}')
    assert out.bbox_xyxy == (1, 2, 3, 4) and out.response == "red"


def test_first_flat_object_matches_reference_regex():
    import re
    cases = ["a {b} {c}", "{}{x}", "{{a}", "{a {b} c}", "}{", "no braces", "{", "{}", "{ }"]
    for text in cases:
        match = re.search(r"{[^}]+}", text)
        assert first_flat_object(text) == (match.group(0) if match else None), text


def test_key_matching_and_truncation():
    out = parse_output("{'region_bbox': [1.9, '2', 3.5, 4], 'points_a': [1, 2], 'points_b': [3.7, 4], "
                       "'points_c': [9, 9], 'response': 3}")
    assert out.bbox_xyxy == (1, 2, 3, 4)  # int() truncation like the reference
    assert out.points_xy == ((1, 2), (3, 4))
    assert out.response == "3"


@pytest.mark.parametrize("text", [
    "", "nothing here", "{'bbox': [1,2,3]}", "{'bbox': 'abc'}", "{'bbox': [1,2,3,'x']}",
    '{"bbox": [NaN, 1, 2, 3]}', '{"bbox": [Infinity, 1, 2, 3]}', "{'bbox': [1e400, 1, 2, 3]}",
    "[1, 2, 3, 4]", "{'a': {'b': 1}}", "{1: 2}", "{'bbox': [[1], 2, 3, 4]}",
])
def test_unparsable_gives_no_answer(text):
    out = parse_output(text)
    assert isinstance(out, ParsedOutput)
    assert out.bbox_xyxy is None


def test_non_string_input():
    assert parse_output(None) == ParsedOutput()
    assert parse_output(b"{'bbox': [1,2,3,4]}") == ParsedOutput()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("{}[]'\":,<>/thinkbox0123456789 .-eE\\\u00e9\u4e2d")),
               max_size=200))
def test_fuzz_never_raises(text):
    out = parse_output(text)
    if out.bbox_xyxy is not None:
        assert len(out.bbox_xyxy) == 4 and all(isinstance(v, int) for v in out.bbox_xyxy)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_unicode_never_raises(text):
    parse_output(text)


@pytest.mark.parametrize("builder", [
    lambda n: "{" * n,
    lambda n: "{}" * (n // 2),
    lambda n: "<think>" * (n // 7),
    lambda n: "{'bbox': [" + "[" * (n - 20) + "}",
    lambda n: "{" + "1," * (n // 2) + "}",
    lambda n: "".join(random.Random(0).choice("{}[]'<>think") for _ in range(n)),
])
def test_one_megabyte_is_fast(builder):
    text = builder(1_000_000)
    start = time.perf_counter()
    parse_output(text)
    elapsed = time.perf_counter() - start
    # Not a speed benchmark: a loose bound that only a super-linear algorithm would break.
    assert elapsed < 10.0


def test_says_not_found():
    assert says_not_found("The object is not found.")
    assert says_not_found("There is no such object")
    assert not says_not_found("The object is found.")
    assert not says_not_found(None)
