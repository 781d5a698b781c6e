"""Real instruction-following data: IFEval's (google/IFEval) and IFBench's
(allenai/IFBench_test) official verifiers, and the conversion of allenai/RLVR-IFeval
training rows into IFEval's schema.

Checking is theirs, not ours: every non-toy instruction id is checked by the
reference checker classes as packaged in `if-verifiable` (Google's IFEval code and
AllenAI's IFBench code). The rule around them is Google's evaluation_lib, written
here (verdicts): strict checks the RAW response, loose accepts any of 8 variants (the
response without its first and/or last line, each stripped, with or without '*'); a
response or variant of only whitespace follows nothing. A `<think>` block is dropped
only when asked (strip_think); the official numbers keep it.

Seven checkers load NLTK data (NLTK_DATA below), which NLTK downloads from the
internet. We never download it implicitly (IFBench's module would try at import):
where the data is missing, a row that needs it is refused with one line that says
how to install it, before any model loads. The package is imported on the first
non-toy id, so toy-world runs never pay for NLTK's import (about 1.5 s).
"""

import functools
import json
import random
from unittest import mock

# Which checkers load NLTK data, and which data (read off the checkers' code;
# tests/test_ifeval.py runs every other checker with no NLTK data installed).
NLTK_DATA = {
    "length_constraints:number_sentences": ("punkt_tab",),
    "change_case:capital_word_frequency": ("punkt_tab",),
    "ratio:stop_words": ("stopwords",),
    "words:start_verb": ("punkt_tab", "averaged_perceptron_tagger_eng"),
    "words:keywords_specific_position": ("punkt_tab",),
    "words:words_position": ("punkt_tab",),
    "format:title_case": ("punkt_tab",),
}
NLTK_DATA_PATHS = {"punkt_tab": "tokenizers/punkt_tab/english/", "stopwords": "corpora/stopwords",
                   "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/"}
INSTALL_HINT = (
    "install it once on a machine with internet: python -m nltk.downloader {names} (then copy ~/nltk_data, or set NLTK_DATA)"
)


@functools.cache
def checkers() -> dict:
    """Every official instruction id -> its checker class (IFEval's 25, IFBench's 58)."""
    import langdetect
    import nltk
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as ifeval_checkers
    langdetect.DetectorFactory.seed = 0  # langdetect samples; fixed, a response always gets the same verdict
    with mock.patch.object(nltk, "download", lambda *args, **kwargs: False):  # IFBench downloads at import
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as ifbench_checkers
    return {**ifeval_checkers, **ifbench_checkers}


def given(kwargs: dict | None) -> dict:
    """The arguments a row gives: datasets fills a kwargs column's absent fields with None."""
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


def missing_nltk_data(instruction_id: str) -> list[str]:
    """The NLTK data packages this instruction's checker needs and cannot find."""
    import nltk
    missing = []
    for name in NLTK_DATA.get(instruction_id, ()):
        try:
            nltk.data.find(NLTK_DATA_PATHS[name])
        except LookupError:
            missing.append(name)
    return missing


# Arguments the checkers iterate over: a string there would be read letter by letter.
LIST_ARGUMENTS = ("keywords", "forbidden_words")


def official_random_letter(instruction_id: str, kwargs: dict | None) -> bool:
    """True for IFEval's letter_frequency rows whose letter is not a letter (official rows
    1122 and 1129 ask for '#' and '!'): the official checker scores them against a random
    letter instead; so do we, drawn from a fixed seed (build_checker)."""
    letter = given(kwargs).get("letter")
    return (instruction_id == "keywords:letter_frequency" and isinstance(letter, str) and len(letter) == 1
            and not "a" <= letter.lower() <= "z")


def instruction_problem(instruction_id: str, kwargs: dict | None) -> str | None:
    """What stops this instruction from being scored, in one line, or None: an unknown
    id, kwargs its checker does not take or rejects, NLTK data not installed."""
    if instruction_id not in checkers():
        return f"unknown instruction id {instruction_id!r} (neither IFEval's nor IFBench's, nor toy:*)"
    missing = missing_nltk_data(instruction_id)
    if missing:
        return (f"instruction {instruction_id!r} is checked with NLTK data {', '.join(missing)}, which is not installed; "
                + INSTALL_HINT.format(names=" ".join(missing)))
    for name in LIST_ARGUMENTS:
        value = given(kwargs).get(name)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            return f"instruction {instruction_id!r}: argument {name!r} must be a list of strings, got {value!r}"[:300]
    checker = checkers()[instruction_id](instruction_id)
    state = random.getstate()
    try:
        checker.build_description(**given(kwargs))
        # A checker given no usable value for an argument draws one at random: the row
        # would be scored against a constraint nobody asked for.
        drew_at_random = random.getstate() != state
    except Exception as error:  # TypeError for an unknown argument, ValueError for a bad value
        return f"instruction {instruction_id!r} rejects its kwargs {kwargs!r}: {error}"[:300]
    finally:
        random.setstate(state)
    if drew_at_random and not official_random_letter(instruction_id, kwargs):
        return f"instruction {instruction_id!r} lacks an argument (or has one out of range) in its kwargs {kwargs!r}"[:300]
    return None


def without_think(response: str) -> str:
    """A reasoning model's answer: the text after its last `</think>` (leading whitespace
    dropped), or nothing when a `<think>` block is never closed. Off by default:
    IFEval and IFBench score the raw response."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1].lstrip()
    return "" if response.lstrip().startswith("<think>") else response


def loose_variants(response: str) -> list[str]:
    """IFEval's loose rule: the response, without its first line, without its last line,
    without both (each then stripped of surrounding whitespace), and those four with
    every '*' removed. An instruction is followed loosely when any variant follows it."""
    lines = response.split("\n")
    trimmed = [response] + ["\n".join(part).strip() for part in (lines[1:], lines[:-1], lines[1:-1])]
    return trimmed + [variant.replace("*", "") for variant in trimmed]


def build_checker(instruction_id: str, kwargs: dict | None, prompt: str):
    """The official checker of one instruction, built as IFEval's evaluation builds it:
    from the row's kwargs, then (for checkers that take it) the prompt. A checker that
    draws an argument at random (the official letter_frequency rows whose letter is not
    a letter) draws from a fixed seed, so a row always gets the same constraint."""
    checker = checkers()[instruction_id](instruction_id)
    state = random.getstate()
    random.seed(0)
    try:
        checker.build_description(**given(kwargs))
        arguments = checker.get_instruction_args()
        if arguments and "prompt" in arguments:
            checker.build_description(prompt=prompt)
    finally:
        random.setstate(state)
    return checker


def verdicts(response: str, instruction_ids: list[str], kwargs_list: list[dict | None], prompt: str,
             strip_think: bool = False) -> list[tuple[bool, bool]]:
    """(strict, loose) for each instruction by the official checkers, under Google's rule
    (IFEval's evaluation_lib; IFBench's is the same): strict checks the raw response,
    loose any of its loose_variants; a variant that is only whitespace follows nothing."""
    if strip_think:
        response = without_think(response)
    variants = loose_variants(response)
    found = []
    for instruction_id, kwargs in zip(instruction_ids, kwargs_list, strict=True):
        checker = build_checker(instruction_id, kwargs, prompt)
        try:
            strict = bool(response.strip()) and bool(checker.check_following(response))
            loose = any(variant.strip() and checker.check_following(variant) for variant in variants)
        except LookupError:  # NLTK data removed after the rows were checked
            missing = sorted({name for i in instruction_ids for name in missing_nltk_data(i)}) or ["punkt_tab"]
            raise ValueError(f"scoring needs NLTK data {', '.join(missing)}; "
                             + INSTALL_HINT.format(names=" ".join(missing))) from None
        found.append((strict, bool(loose)))
    return found


# allenai/RLVR-IFeval names its verifier in ground_truth["func_name"]; these are the
# IFEval ids and argument names they correspond to.
RLVR_FUNCTIONS = {
    "validate_no_commas": ("punctuation:no_comma", {}),
    "validate_lowercase": ("change_case:english_lowercase", {}),
    "validate_uppercase": ("change_case:english_capital", {}),
    "validate_frequency_capital_words": (
        "change_case:capital_word_frequency",
        {"N": "capital_frequency", "quantifier": "capital_relation"},
    ),
    "validate_word_constraint": ("length_constraints:number_words", {"N": "num_words", "quantifier": "relation"}),
    "verify_sentence_constraint": ("length_constraints:number_sentences", {"N": "num_sentences", "quantifier": "relation"}),
    "verify_paragraph_count": ("length_constraints:number_paragraphs", {"N": "num_paragraphs"}),
    "validate_paragraphs": (
        "length_constraints:nth_paragraph_first_word",
        {"N": "num_paragraphs", "i": "nth_paragraph", "first_word": "first_word"},
    ),
    "validate_placeholders": ("detectable_content:number_placeholders", {"N": "num_placeholders"}),
    "verify_postscript": ("detectable_content:postscript", {"postscript_marker": "postscript_marker"}),
    "verify_bullet_points": ("detectable_format:number_bullet_lists", {"N": "num_bullets"}),
    "validate_title": ("detectable_format:title", {}),
    "validate_highlighted_sections": ("detectable_format:number_highlighted_sections", {"N": "num_highlights"}),
    "validate_sections": ("detectable_format:multiple_sections", {"N": "num_sections", "section_splitter": "section_spliter"}),
    "validate_json_format": ("detectable_format:json_format", {}),
    "validate_choice": ("detectable_format:constrained_response", {}),
    "validate_two_responses": ("combination:two_responses", {}),
    "validate_repeat_prompt": ("combination:repeat_prompt", {"original_prompt": "prompt_to_repeat"}),
    "validate_end": ("startend:end_checker", {"end_phrase": "end_phrase"}),
    "validate_quotation": ("startend:quotation", {}),
    "verify_keywords": ("keywords:existence", {"keyword_list": "keywords"}),
    "validate_forbidden_words": ("keywords:forbidden_words", {"forbidden_words": "forbidden_words"}),
    "verify_keyword_frequency": ("keywords:frequency", {"word": "keyword", "N": "frequency", "quantifier": "relation"}),
    "verify_letter_frequency": (
        "keywords:letter_frequency",
        {"letter": "letter", "N": "let_frequency", "quantifier": "let_relation"},
    ),
}


class NotScorable(ValueError):
    """A well-formed row that IFEval's checkers cannot score as its dataset means it."""


def from_rlvr(row: dict, index: int = 0) -> dict:
    """An RLVR-IFeval row (messages, ground_truth) as an IFEval row (prompt,
    instruction_id_list, kwargs). 'at most N' becomes 'less than N + 1'. An 'around N'
    row raises NotScorable (its own verifier accepts counts within max(round(N / 10), 1)
    of N, a relation IFEval's checkers do not have): load_rows drops it with a count."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "user" for m in messages):
        raise ValueError(f"row {index}: field 'messages' must be a list of chat messages with a user turn")
    try:
        truth = json.loads(row["ground_truth"]) if isinstance(row.get("ground_truth"), str) else row.get("ground_truth")
    except json.JSONDecodeError:
        raise ValueError(f"row {index}: field 'ground_truth' is not valid JSON") from None
    if not isinstance(truth, dict) or truth.get("func_name") not in RLVR_FUNCTIONS:
        name = truth.get("func_name") if isinstance(truth, dict) else None
        raise ValueError(f"row {index}: field 'ground_truth' names verifier {name!r}, which has no IFEval counterpart here")
    instruction_id, names = RLVR_FUNCTIONS[truth["func_name"]]
    kwargs = {ours: truth[theirs] for theirs, ours in names.items() if truth.get(theirs) is not None}
    for key in ("relation", "capital_relation", "let_relation"):
        if kwargs.get(key) == "at most":
            number_key = {"relation": "num_words" if "num_words" in kwargs else "num_sentences" if "num_sentences" in kwargs
                          else "frequency", "capital_relation": "capital_frequency", "let_relation": "let_frequency"}[key]
            kwargs[key], kwargs[number_key] = "less than", int(kwargs[number_key]) + 1
        elif kwargs.get(key) == "around":  # no IFEval relation means |count - N| <= max(round(N / 10), 1)
            raise NotScorable(f"row {index}: verifier {truth['func_name']!r} asks for 'around' {truth.get('N')}, which "
                              "IFEval's checkers cannot score as the dataset defines it")
    prompt = next(m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "user")
    return {"key": index, "prompt": prompt, "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
