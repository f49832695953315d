"""The FineRS templates, byte for byte, written out literally (not from the module's pieces)."""

import pytest

from finers_rt.errors import InputError
from finers_rt.prompts import (DEFAULT_TEMPLATES, PromptTemplates, build_gse_prompt,
                               build_lpr_prompt, check_instruction)

COMMON_THINK = ("Output the thinking process in <think> </think> and final answer in "
                "<answer> </answer> tags.")

GSE_REFERRING = (
    "Based on the 'the red pen', identify a 256*256 bounding box that best localizes the region "
    "most relevant to the query. And respond with whether the object is found."
    "Compare the difference between regions and find the most closely matched one."
    + COMMON_THINK +
    "Output the 256*256 region bbox and the final response inside the interested object in JSON format."
    "i.e., <think> thinking process here </think>"
    "<answer>{'bbox': [x_min,y_min,x_min+256,y_min+256], 'response': 'The object is found.'}</answer>")

LPR_REFERRING = (
    "Please find 'the red pen' with bbox and points. And respond with whether the object is found."
    "Compare the difference between objects and find the most closely matched one."
    + COMMON_THINK +
    "Output the one bbox and points of two largest inscribed circles inside the interested object in JSON format."
    "i.e., <think> thinking process here </think>"
    "<answer>{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180], "
    "response: 'The object is found.'}</answer>")


def test_gse_referring_byte_exact():
    assert build_gse_prompt("the red pen") == GSE_REFERRING


def test_lpr_referring_byte_exact():
    assert build_lpr_prompt("the red pen") == LPR_REFERRING


def test_gse_option_and_reasoning_first_sentences():
    opt = build_gse_prompt("the cup", "option", "(A) red (B) blue")
    assert opt.startswith("Based on the 'the cup', identify a 256*256 bounding box that best "
                          "localizes the region most relevant to the query. And give me a correct "
                          "option from (A) red (B) blue.Compare the difference between regions")
    assert opt.endswith("<answer>{'bbox': [x_min,y_min,x_min+256,y_min+256], 'response': 'A'}</answer>")
    rea = build_gse_prompt("the cup", "reasoning")
    assert ("relevant to the query. And give me a final response with a word or phrase.Compare"
            in rea)


def test_lpr_option_reasoning_plain():
    opt = build_lpr_prompt("the cup", "option", "(A) x (B) y")
    assert opt.startswith("Please find 'the cup' with bbox and points. And give me a correct option "
                          "from (A) x (B) y.Compare the difference between objects")
    assert opt.endswith("'points_2': [35,180], response: 'A'}</answer>")
    rea = build_lpr_prompt("the cup", "reasoning")
    assert rea.endswith("response: 'The object is white.' }</answer>")
    plain = build_lpr_prompt("the cup", plain=True)
    assert plain.startswith("Please find 'the cup' with bbox and points.Compare the difference")
    assert plain.endswith("<answer>{'bbox': [10,100,200,210], 'points_1': [30,110], "
                          "'points_2': [35,180]}</answer>")


def test_question_with_braces_is_not_reinterpreted():
    text = build_lpr_prompt("the {Answer} sign")
    assert "Please find 'the {Answer} sign' with" in text


def test_templates_round_trip_through_dict():
    again = PromptTemplates.from_dict(DEFAULT_TEMPLATES.to_dict())
    assert again == DEFAULT_TEMPLATES


@pytest.mark.parametrize("question,qtype,options,needle", [
    ("", "referring", None, "empty"),
    ("   ", "referring", None, "empty"),
    ("x" * 5000, "referring", None, "5000 characters"),
    ("pen", "option", None, "needs the options"),
    ("pen", "referring", "(A) a", "use --type option"),
    ("pen", "refering", None, "did you mean 'referring'"),
])
def test_bad_instructions(question, qtype, options, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        check_instruction(question, qtype, options)
