"""The fixed text the random checkpoints' BPE tokenizer is trained on (deterministic).

FineRS prompt sentences, JSON-like answers, digits, punctuation and colour/shape/position words,
so that prompts tokenize into a realistic number of multi-byte tokens.
"""

from __future__ import annotations

_SENTENCES = (
    "Based on the '{Question}', identify a 256*256 bounding box that best localizes the region "
    "most relevant to the query. And respond with whether the object is found.",
    "And give me a final response with a word or phrase.",
    "And give me a correct option from {Options}.",
    "Compare the difference between regions and find the most closely matched one.",
    "Compare the difference between objects and find the most closely matched one.",
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    "Output the 256*256 region bbox and the final response inside the interested object in JSON format.",
    "Output the one bbox and points of two largest inscribed circles inside the interested object "
    "in JSON format.",
    "i.e., <think> thinking process here </think>",
    "<answer>{'bbox': [x_min,y_min,x_min+256,y_min+256], 'response': 'The object is found.'}</answer>",
    "Please find '{Question}' with bbox and points. And respond with whether the object is found.",
    "<answer>{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180], "
    "response: 'The object is found.'}</answer>",
    "<answer>{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180], "
    "'response': 'The object is white.'}</answer>",
    "You are a helpful assistant.",
    "What is the colour of the small sign near the road? Which option is correct? A B C D",
    "(A) red (B) blue (C) green (D) yellow",
)

_WORDS = (
    "red green blue yellow white black orange purple pink brown grey gray silver gold "
    "circle square triangle rectangle star round oval small tiny large left right top bottom "
    "center middle above below near far car person sign boat bird tree window roof road "
    "the a an is of in on with and or not found object region answer think response bbox points"
)


def corpus_lines() -> list[str]:
    """Return the training corpus as a list of lines, always the same."""
    lines = list(_SENTENCES)
    lines += [_WORDS, _WORDS.title(), _WORDS.upper()]
    lines += [" ".join(str(i) for i in range(start, start + 50)) for start in range(0, 2000, 50)]
    lines += ["[" + ",".join(str((i * 37 + j * 11) % 1920) for j in range(4)) + "]"
              for i in range(64)]
    lines += ["!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \n\t"]
    return lines
