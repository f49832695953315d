"""FineRS prompt templates: interface constants, byte-exact with the reference.

Real FineRS checkpoints were trained and evaluated with exactly these strings (sentences are
concatenated with no space between them). The templates are stored in every bundle manifest
and the runtime formats the ones it reads from there.

Note: the LPR `reasoning` example answer ends in `'The object is white.' }` (a space before the
brace) and `response` is unquoted in every LPR example: both are what the reference code sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from finers_rt.errors import InputError, ManifestError, suggest

QUESTION_TYPES = ("referring", "reasoning", "option")
LPR_KINDS = QUESTION_TYPES + ("plain",)
MAX_INSTRUCTION_CHARS = 2000

_THINK = "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
_EXAMPLE = "i.e., <think> thinking process here </think>" + "<answer>{Answer}</answer>"

_GSE_HEAD = ("Based on the '{Question}', identify a 256*256 bounding box that best localizes the "
             "region most relevant to the query.")
_GSE_TAIL = ("Compare the difference between regions and find the most closely matched one."
             + _THINK
             + "Output the 256*256 region bbox and the final response inside the interested object in JSON format."
             + _EXAMPLE)

_LPR_HEAD = "Please find '{Question}' with bbox and points."
_LPR_TAIL = ("Compare the difference between objects and find the most closely matched one."
             + _THINK
             + "Output the one bbox and points of two largest inscribed circles inside the interested object in JSON format."
             + _EXAMPLE)

_ASK = {
    "referring": " And respond with whether the object is found.",
    "reasoning": " And give me a final response with a word or phrase.",
    "option": " And give me a correct option from {Options}.",
    "plain": "",
}

_GSE_REGION = "{'bbox': [x_min,y_min,x_min+256,y_min+256], "
_LPR_BOX = "{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180]"


@dataclass(frozen=True)
class PromptTemplate:
    """`template` has {Question}, {Answer} and (option only) {Options}; `answer` is the literal
    example answer substituted for {Answer}."""

    template: str
    answer: str

    def format(self, question: str, options: str | None = None) -> str:
        return self.template.format(Question=question, Answer=self.answer, Options=options or "")


def _defaults() -> "PromptTemplates":
    gse = {
        "referring": PromptTemplate(_GSE_HEAD + _ASK["referring"] + _GSE_TAIL,
                                    _GSE_REGION + "'response': 'The object is found.'}"),
        "reasoning": PromptTemplate(_GSE_HEAD + _ASK["reasoning"] + _GSE_TAIL,
                                    _GSE_REGION + "'response': 'The object is found.'}"),
        "option": PromptTemplate(_GSE_HEAD + _ASK["option"] + _GSE_TAIL,
                                 _GSE_REGION + "'response': 'A'}"),
    }
    lpr = {
        "referring": PromptTemplate(_LPR_HEAD + _ASK["referring"] + _LPR_TAIL,
                                    _LPR_BOX + ", response: 'The object is found.'}"),
        "reasoning": PromptTemplate(_LPR_HEAD + _ASK["reasoning"] + _LPR_TAIL,
                                    _LPR_BOX + ", response: 'The object is white.' }"),
        "option": PromptTemplate(_LPR_HEAD + _ASK["option"] + _LPR_TAIL,
                                 _LPR_BOX + ", response: 'A'}"),
        "plain": PromptTemplate(_LPR_HEAD + _LPR_TAIL, _LPR_BOX + "}"),
    }
    return PromptTemplates(gse=gse, lpr=lpr)


@dataclass(frozen=True)
class PromptTemplates:
    """The GSE templates per question type and the LPR templates per type (+ "plain")."""

    gse: Mapping[str, PromptTemplate]
    lpr: Mapping[str, PromptTemplate]

    def __post_init__(self):
        for stage, table, kinds in (("gse", self.gse, QUESTION_TYPES), ("lpr", self.lpr, LPR_KINDS)):
            missing = [k for k in kinds if k not in table]
            unknown = [k for k in table if k not in kinds]
            if missing or unknown:
                raise ManifestError(f"{stage} templates: missing {missing}, unknown {unknown}")

    def to_dict(self) -> dict[str, Any]:
        return {stage: {k: {"template": t.template, "answer": t.answer} for k, t in table.items()}
                for stage, table in (("gse", self.gse), ("lpr", self.lpr))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptTemplates":
        try:
            return cls(**{stage: {k: PromptTemplate(str(v["template"]), str(v["answer"]))
                                  for k, v in data[stage].items()} for stage in ("gse", "lpr")})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"prompt templates are malformed: {exc!r}") from None


DEFAULT_TEMPLATES = _defaults()


def check_instruction(question: str, question_type: str, options: str | None) -> str:
    """Validate an instruction; return it unchanged. Raises InputError on bad input."""
    if question_type not in QUESTION_TYPES:
        raise InputError(f"unknown question type '{question_type}'"
                         f"{suggest(question_type, QUESTION_TYPES)}; expected one of {QUESTION_TYPES}")
    if not isinstance(question, str) or not question.strip():
        raise InputError("the instruction is empty; say what to find, e.g. 'the red pen'")
    if len(question) > MAX_INSTRUCTION_CHARS:
        raise InputError(f"the instruction is {len(question)} characters; at most "
                         f"{MAX_INSTRUCTION_CHARS} are accepted")
    if question_type == "option" and not (options and options.strip()):
        raise InputError("question type 'option' needs the options, e.g. '(A) red (B) blue'")
    if question_type != "option" and options:
        raise InputError(f"options were given but the question type is '{question_type}'; "
                         "use --type option")
    return question


def build_gse_prompt(question: str, question_type: str = "referring", options: str | None = None,
                     templates: PromptTemplates = DEFAULT_TEMPLATES) -> str:
    """The GSE user text for an instruction (the image goes before it in the chat turn)."""
    check_instruction(question, question_type, options)
    return templates.gse[question_type].format(question, options)


def build_lpr_prompt(question: str, question_type: str = "referring", options: str | None = None,
                     templates: PromptTemplates = DEFAULT_TEMPLATES, plain: bool = False) -> str:
    """The LPR user text; `plain=True` is the segmentation-only prompt (no QA sentence)."""
    check_instruction(question, question_type, options)
    return templates.lpr["plain" if plain else question_type].format(question, options)
