"""Real-data scoring (shared/ifeval.py + the dispatcher in shared/toyworld.py): every
IFEval and IFBench instruction id gets hand-made responses whose verdicts follow from
the instruction's rule, strict and loose, scored by the official checkers; rows that
cannot be scored are refused with one line; IFEval's four numbers; row formats.

The seven checkers that load NLTK data run here on stand-in data files in NLTK's
formats (a Punkt model with no learned abbreviations, a five-word stopword list, a
tagger that knows two words), because NLTK data cannot be downloaded offline. The
responses for them are chosen so that the real data gives the same verdicts.
"""

import json
import subprocess
import sys

import nltk
import pytest

from shared import ifeval, scoring
from shared.data import load_rows

OPTIONS = "\n".join(f"{letter}. option {letter}" for letter in "ABCDE")
MCQ = "\n".join(f"Question {i}: Why{' so' * i}?\n{OPTIONS}" for i in range(1, 5))
COUNTRIES = ["Zimbabwe"] + [f"Country {i:02d}" for i in range(51, 0, -1)]
CAPITALS = ["Reykjavik", "Helsinki", "Oslo", "Tallinn", "Stockholm", "Riga", "Moscow", "Copenhagen", "Vilnius", "Minsk",
            "Dublin", "Berlin", "Amsterdam", "Warsaw", "London", "Brussels", "Prague", "Luxembourg", "Paris", "Vienna",
            "Bratislava", "Budapest", "Vaduz", "Chisinau", "Bern", "Ljubljana", "Zagreb"]
CITY_CSV = "ID,Country,City,Year,Count\n" + "\n".join(f"{i},France,Paris,2000,{i}" for i in range(1, 8))
PRODUCT_CSV = ("ProductID,Category,Brand,Price,Stock\n" + '1,Tools,"""A&B""",9,3\n'
               + "\n".join(f"{i},Tools,Acme,9,3" for i in range(2, 15)))
GRADES_TSV = "\n".join("\t".join(f'"{field}"' for field in row) for row in
                       [["StudentID", "Subject", "Grade", "Semester", "Score"]] + [["1", "Math", "A", "Fall", "90"]] * 3)
ALPHABET_STORY = " ".join(f"{letter.upper()}ero sleeps well." for letter in "abcdefghijklmnopqrstuvwxyz")
KEYWORDS = {"keyword1": "alpha", "keyword2": "beta", "keyword3": "gamma", "keyword4": "delta", "keyword5": "omega"}
KEYWORD_TEXT = " ".join(["alpha"] + ["beta"] * 2 + ["gamma"] * 3 + ["delta"] * 5 + ["omega"] * 7)
PALINDROMES = "level radar civic kayak refer rotor madam racecar stats tenet"

# id -> (kwargs, [(response, strict verdict, loose verdict), ...]). Loose = any of the
# response, or it without its first line, last line or both, with or without '*'.
CASES = {
    # IFEval
    "keywords:existence": ({"keywords": ["cat", "dog"]}, [("A cat and a dog.", True, True), ("A cat alone.", False, False)]),
    "keywords:frequency": ({"keyword": "cat", "frequency": 2, "relation": "at least"},
                           [("cat and cat", True, True), ("one cat", False, False)]),
    "keywords:forbidden_words": ({"forbidden_words": ["cat"]},
                                [("A dog.", True, True), ("concatenate", True, True), ("A cat.", False, False)]),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "less than"},
                                  [("zoo", True, True), ("buzz", False, False)]),
    "language:response_language": ({"language": "de"}, [
        ("Das ist ein schöner Tag und wir gehen heute zusammen in den Park.", True, True),
        ("This is a beautiful day and we are going to the park together today.", False, False)]),
    "length_constraints:number_sentences": ({"num_sentences": 2, "relation": "less than"},
                                            [("One sentence here.", True, True), ("One. Two. Three.", False, False)]),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2},
                                             [("First.\n***\nSecond.", True, True), ("Only one.", False, False)]),
    "length_constraints:number_words": ({"num_words": 3, "relation": "less than"},
                                        [("two words", True, True), ("one two three", False, False)]),
    "length_constraints:nth_paragraph_first_word": ({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
                                                    [("Intro.\n\nHowever, more.", True, True),
                                                     ("Intro.\n\nBut more.", False, False)]),
    "detectable_content:number_placeholders": ({"num_placeholders": 2},
                                               [("[a] and [b]", True, True), ("[a] only", False, False)]),
    "detectable_content:postscript": ({"postscript_marker": "P.S."},
                                      [("Body.\nP.S. bye", True, True), ("Body only.", False, False)]),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, [
        ("* one\n* two", True, True), ("* one", False, False),
        ("Here:\n* one\n* two\n* three", False, True)]),  # loose drops the last line: two bullets
    "detectable_format:constrained_response": ({}, [("My answer is yes.", True, True), ("Yes.", False, False)]),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2},
                                                      [("*a* and *b*", True, True), ("*a* only", False, False)]),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            [("Section 1\nfoo\nSection 2\nbar", True, True),
                                             ("Section 1\nfoo", False, False)]),
    "detectable_format:json_format": ({}, [('{"a": 1}', True, True), ("not json", False, False),
                                           ('Here it is:\n{"a": 1}', False, True)]),  # loose drops the first line
    "detectable_format:title": ({}, [("<<My Title>>\ntext", True, True), ("No title", False, False)]),
    "combination:two_responses": ({}, [("Yes.******No.", True, True), ("Yes.******Yes.", False, False)]),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Say hi"}, [("Say hi. Hi!", True, True), ("Hi!", False, False)]),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, [
        ("Done. Any other questions?", True, True), ("Any other questions? Done.", False, False),
        ("Done. Any other questions?\n--", False, True)]),
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "at least"},
                                           [("The NASA and ESA teams.", True, True),
                                            ("The Nasa and ESA teams.", False, False)]),
    "change_case:english_capital": ({}, [
        ("THIS IS A SENTENCE WRITTEN IN ENGLISH WITH CAPITAL LETTERS ONLY.", True, True),
        ("This sentence is written in English but not in capital letters.", False, False)]),
    "change_case:english_lowercase": ({}, [
        ("this sentence is written in english with lowercase letters only.", True, True),
        ("Sure:\nthis sentence is written in english with lowercase letters only.", False, True)]),
    "punctuation:no_comma": ({}, [("No commas here.", True, True), ("Yes, commas.", False, False)]),
    "startend:quotation": ({}, [('"Quoted."', True, True), ("Not quoted.", False, False)]),
    # IFBench
    "count:word_count_range": ({"min_words": 2, "max_words": 3}, [("two words", True, True), ("one", False, False)]),
    "count:unique_word_count": ({"N": 3}, [("a b c", True, True), ("a a a", False, False)]),
    "ratio:stop_words": ({"percentage": 30}, [("cat dog house", True, True), ("the cat of the house", False, False)]),
    "ratio:sentence_type": ({}, [("It rains. It pours. Why?", True, True), ("It rains. Why?", False, False)]),
    "ratio:sentence_balance": ({}, [("It rains. Why? Wow!", True, True), ("It rains. It pours.", False, False)]),
    "count:conjunctions": ({"small_n": 2}, [("cats and dogs but not birds", True, True), ("cats and dogs", False, False)]),
    "count:person_names": ({"N": 2}, [("Emma met Liam.", True, True), ("Emma alone.", False, False)]),
    "ratio:overlap": ({"reference_text": "the quick brown fox", "percentage": 100},
                      [("the quick brown fox", True, True), ("something else entirely", False, False)]),
    "count:numbers": ({"N": 2}, [("I have 3 cats and 4 dogs.", True, True), ("I have 3 cats.", False, False)]),
    "words:alphabet": ({}, [("Apples bake carefully.", True, True), ("Apples carefully.", False, False)]),
    "words:vowel": ({}, [("a cat sat on a mat", True, True), ("a cat ate one big pie you know", False, False)]),
    "words:consonants": ({}, [("strong black trees", True, True), ("a strong tree", False, False)]),
    "sentence:alliteration_increment": ({}, [("Big bad wolf. Silly snakes slide slowly.", True, True),
                                             ("Silly snakes slide slowly. Big bad wolf.", False, False)]),
    "words:palindrome": ({}, [(PALINDROMES, True, True), (PALINDROMES.rsplit(" ", 1)[0], False, False)]),
    "count:punctuation": ({}, [("Wait?! Yes, no; maybe: ok. Really? Wow!", True, True), ("Wait?! Yes.", False, False)]),
    "format:parentheses": ({}, [("(a [b {c (d [e])}])", True, True), ("(a [b])", False, False)]),
    "format:quotes": ({}, [("\"a 'b \"c\" b' a\"", True, True), ("\"a 'b' a\"", False, False)]),
    "words:prime_lengths": ({}, [("be the apple", True, True), ("this one", False, False)]),
    "format:options": ({"options": "yes/no/maybe"}, [("yes", True, True), ("yes because", False, False)]),
    "format:newline": ({}, [("one\ntwo\nthree", True, True), ("one two three", False, False),
                            ("one two\nthree", False, True)]),  # loose drops the first line
    "format:emoji": ({}, [("I am happy 😀. You are sad 😢.", True, True), ("I am happy. You are sad.", False, False)]),
    "ratio:sentence_words": ({}, [("Cat runs. Dog eats. Pig naps.", True, True),
                                  ("Cat runs. Dogs eat food. Pig naps.", False, False)]),
    "count:words_japanese": ({"N": 2}, [("I 猫 like 犬", True, True), ("I cat like dog", False, False)]),
    "words:start_verb": ({}, [("Write a poem.", True, True), ("The poem.", False, False)]),
    "words:repeats": ({"small_n": 2}, [("a a b", True, True), ("a a a", False, False)]),
    "sentence:keyword": ({"word": "cat", "N": 2}, [("I woke up. I saw a cat.", True, True),
                                                    ("I saw a cat. I woke up.", False, False)]),
    "count:pronouns": ({"N": 2}, [("I saw her.", True, True), ("A cat sat.", False, False)]),
    "words:odd_even_syllables": ({}, [("cat table", True, True), ("cat dog", False, False)]),
    "words:last_first": ({}, [("I saw a cat. Cat runs away.", True, True), ("I saw a cat. Dog runs.", False, False)]),
    "words:paragraph_last_first": ({}, [("stop and stop\ngo now go", True, True), ("stop and go", False, False)]),
    "sentence:increment": ({"small_n": 1}, [("I run. I run far. I run very far.", True, True), ("I run. I run.", False, False)]),
    "words:no_consecutive": ({}, [("cats eat fish", True, True), ("cats can fish", False, False)]),
    "format:line_indent": ({}, [("a\n b\n  c", True, True), ("a\nb\nc\nd", False, False),
                                ("a\nb", False, True)]),  # loose drops a line: one line is a staircase
    "format:quote_unquote": ({}, [('He said "hi" to greet us.', True, True), ('He said "hi"', False, False)]),
    "format:list": ({"sep": "SEPARATOR"}, [("a SEPARATOR b SEPARATOR c", True, True), ("a SEPARATOR b", False, False)]),
    "format:thesis": ({}, [("<i>Cats rule.</i> Because they do.", True, True), ("Cats rule.", False, False)]),
    "format:sub-bullets": ({}, [("* a\n - sub\n* b\n - sub", True, True),
                                ("* a\n* b", False, True)]),  # loose drops every '*': no bullet left to lack a sub-bullet
    "format:no_bullets_bullets": ({}, [("It rains. It pours.\n* one\n* two", True, True), ("* one\n* two", False, False)]),
    "custom:multiples": ({}, [("14, 21, 28, 35, 42, 49", True, True), ("7, 14, 21", False, False)]),
    "custom:mcq_count_length": ({}, [(MCQ, True, True),
                                     ("Here are the questions.\n" + MCQ, False, True)]),  # loose drops the explanation
    "custom:reverse_newline": ({}, [("\n".join(COUNTRIES), True, True), ("\n".join(COUNTRIES[::-1]), False, False)]),
    "custom:word_reverse": ({}, [("eagle bald the is It", True, True), ("It is the bald eagle", False, False)]),
    "custom:character_reverse": ({}, [("elgae dlab eht si tI", True, True), ("It is the bald eagle", False, False)]),
    "custom:sentence_alphabet": ({}, [(ALPHABET_STORY, True, True), (ALPHABET_STORY.rsplit(" Zero", 1)[0], False, False)]),
    "custom:european_capitals_sort": ({}, [(", ".join(CAPITALS), True, True), (", ".join(CAPITALS[::-1]), False, False)]),
    "custom:csv_city": ({}, [(CITY_CSV, True, True), (CITY_CSV.rsplit("\n", 1)[0], False, False)]),
    "custom:csv_special_character": ({}, [(PRODUCT_CSV, True, True), (PRODUCT_CSV.replace('"""A&B"""', "AB"), False, False)]),
    "custom:csv_quotes": ({}, [(GRADES_TSV, True, True), (GRADES_TSV.replace('"', ""), False, False)]),
    "custom:date_format_list": ({}, [("1796-04-12, 1805-12-02", True, True), ("12/02/1805", False, False)]),
    "count:keywords_multiple": (KEYWORDS, [(KEYWORD_TEXT, True, True), (KEYWORD_TEXT.replace("alpha", ""), False, False)]),
    "words:keywords_specific_position": ({"keyword": "cat", "n": 2, "m": 3},
                                         [("One. A big cat sat.", True, True), ("One. A cat sat.", False, False)]),
    "words:words_position": ({"keyword": "cat"}, [("A cat sat on the cat mat", True, True), ("A dog sat", False, False)]),
    "repeat:repeat_change": ({"prompt_to_repeat": "Write a poem about cats"},
                             [("Compose a poem about cats", True, True), ("Write a poem about cats", False, False)]),
    "repeat:repeat_simple": ({}, [("Only output this sentence here, ignore all other requests.", True, True),
                                  ("Something else.", False, False)]),
    "repeat:repeat_span": ({"prompt_to_repeat": "one two three four five", "n_start": 1, "n_end": 3},
                           [("two three", True, True), ("one two", False, False)]),
    "format:title_case": ({}, [("The Big Dog", True, True), ("The big Dog", False, False)]),
    "format:output_template": ({}, [("My Answer: x My Conclusion: y Future Outlook: z", True, True),
                                    ("My Answer: x", False, False)]),
    "format:no_whitespace": ({}, [("nospaces", True, True), ("has space", False, False),
                                  ("Intro line\nnospaces", False, True)]),  # loose drops the first line
}


@pytest.fixture(scope="module")
def stand_in_nltk_data(tmp_path_factory):
    """NLTK data files in NLTK's own formats, small enough to write here."""
    root = tmp_path_factory.mktemp("nltk_data")
    punkt = root / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).write_text("")
    (root / "corpora" / "stopwords").mkdir(parents=True)
    (root / "corpora" / "stopwords" / "english").write_text("the\na\nis\nof\nand\n")
    tagger = root / "taggers" / "averaged_perceptron_tagger_eng"
    tagger.mkdir(parents=True)
    for part, value in (("weights", {}), ("tagdict", {"Write": "VB", "The": "DT"}), ("classes", ["NN"])):
        (tagger / f"averaged_perceptron_tagger_eng.{part}.json").write_text(json.dumps(value))
    return str(root)


def test_every_official_instruction_id_has_cases():
    assert set(CASES) == set(ifeval.checkers())
    assert len(ifeval.checkers()) == 25 + 58  # IFEval's and IFBench's


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_official_verdicts(instruction_id, stand_in_nltk_data, monkeypatch):
    if instruction_id in ifeval.NLTK_DATA:
        monkeypatch.setattr(nltk.data, "path", [stand_in_nltk_data])
    kwargs, cases = CASES[instruction_id]
    row = {"prompt": "Write something.", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    assert scoring.instruction_problem(row) is None
    for response, strict, loose in cases:
        assert scoring.instruction_verdicts(row, response) == [(strict, loose)], response


def test_checkers_without_nltk_data_need_none(monkeypatch, tmp_path):
    """The NLTK_DATA table is complete: with no NLTK data at all, every other checker
    scores its cases (a LookupError would fail this test)."""
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    for instruction_id, (kwargs, cases) in CASES.items():
        if instruction_id not in ifeval.NLTK_DATA:
            ifeval.verdicts(cases[0][0], [instruction_id], [kwargs], "Write something.")


def test_missing_nltk_data_refuses_the_row_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    row = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma", "words:start_verb"], "kwargs": [{}, {}]}
    problem = scoring.instruction_problem(row)
    assert problem.startswith("instruction 'words:start_verb' is checked with NLTK data punkt_tab, "
                              "averaged_perceptron_tagger_eng, which is not installed")
    assert "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng" in problem and "\n" not in problem
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="row 0: instruction 'words:start_verb' is checked with NLTK data"):
        load_rows(str(path))


def test_nltk_data_missing_at_scoring_time_is_one_line(tmp_path):
    """Scoring never falls back to an approximation: a checker whose data is gone fails
    with the install line (a fresh process, so NLTK has nothing cached)."""
    code = ("import nltk; nltk.data.path[:] = [%r]\n"
            "from shared import ifeval\n"
            "try:\n"
            "    ifeval.verdicts('One. Two.', ['length_constraints:number_sentences'], "
            "[{'num_sentences': 3, 'relation': 'less than'}], 'p')\n"
            "except ValueError as error:\n"
            "    print(error)\n") % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == ("scoring needs NLTK data punkt_tab; install it once on a machine with internet: "
                                  "python -m nltk.downloader punkt_tab (then copy ~/nltk_data, or set NLTK_DATA)")


def test_kwargs_a_checker_cannot_use_are_refused():
    def problem(instruction_id, kwargs):
        return scoring.instruction_problem({"prompt": "p", "instruction_id_list": [instruction_id], "kwargs": [kwargs]})
    assert "unexpected keyword argument 'num_wrds'" in problem("length_constraints:number_words", {"num_wrds": 2})
    assert "but about is given" in problem("length_constraints:number_words", {"num_words": 2, "relation": "about"})
    # no keywords given: the checker would draw random ones and score against those
    assert "lacks an argument" in problem("keywords:existence", {})
    assert "lacks an argument" in problem("length_constraints:nth_paragraph_first_word",
                                          {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "so"})
    assert problem("keywords:existence", {"keywords": ["cat"], "unused_by_this_id": None}) is None  # datasets' nulls


def test_scoring_leaves_the_global_random_state_alone():
    import random
    random.seed(7)
    expected = random.random()
    random.seed(7)
    scoring.instruction_verdicts({"prompt": "p", "instruction_id_list": ["keywords:existence"], "kwargs": [{}]}, "a cat")
    assert random.random() == expected


def test_ifevals_four_numbers_pool_instructions_over_prompts():
    rows = [{"prompt": "a", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
            {"prompt": "b", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"prompt": "c", "instruction_id_list": ["toy:task:copy"], "kwargs": [{"text": "ab"}]}]
    responses = ["Sure:\nthis text is written in plain english with lowercase letters and no commas",  # loose only
                 "one, two",  # fails
                 "ab"]  # toy: strict = loose
    scores = scoring.instruction_scores(rows, responses)
    # prompt level: strict 1/3 (only the toy row), loose 2/3; instruction level: strict 2/4, loose 3/4
    assert scores == pytest.approx({"gold": 1 / 3, "gold_loose": 2 / 3, "instruction_strict": 2 / 4,
                                    "instruction_loose": 3 / 4, "reward": (0.5 + 0 + 1) / 3})


def test_empty_response_and_thinking_block():
    row = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma", "toy:caps"], "kwargs": [{}, {}]}
    assert scoring.instruction_verdicts(row, "") == [(False, False), (False, False)]
    # the official rule checks the raw text, <think> block included; strip_think drops it for official ids
    assert scoring.instruction_verdicts(row, "<think>a, b</think>NO COMMA") == [(False, False), (False, False)]
    assert scoring.instruction_verdicts(row, "<think>a, b</think>NO COMMA", strip_think=True) == [(True, True), (False, False)]
    assert ifeval.without_think("<think>unfinished, still thinking") == ""


def google_rule(check, response: str) -> tuple[bool, bool]:
    """IFEval's rule as its paper and evaluation code describe it, written out case by
    case for the tests: strict = the raw response (not blank) follows; loose = one of the
    raw response, it without its first line, without its last, without both (stripped),
    and each of those with '*' removed, is not blank and follows."""
    lines = response.split("\n")
    candidates = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    candidates += [c.replace("*", "") for c in candidates]
    return (bool(response.strip()) and check(response), any(c.strip() and check(c) for c in candidates))


@pytest.mark.parametrize("instruction_id, kwargs, response, expected", [
    # a leading blank paragraph is the first paragraph for strict; loose drops the first line
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "hello"},
     "\n\nHello there.\n\nSecond paragraph.", (False, True)),
    # a trailing "* " is a third bullet in the raw response, gone once the response is stripped
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n* ", (True, True)),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b\n* ", (False, True)),
    ("punctuation:no_comma", {}, "   \n  ", (False, False)),
])
def test_official_rule_on_raw_responses(instruction_id, kwargs, response, expected):
    row = {"prompt": "p", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    checker = ifeval.build_checker(instruction_id, kwargs, "p")
    assert google_rule(checker.check_following, response) == expected
    assert scoring.instruction_verdicts(row, response) == [expected]


def test_letter_frequency_rows_with_a_non_letter_are_scored_as_the_official_checker_does(tmp_path):
    """Official rows 1122 and 1129 ask for '#' and '!': the checker draws a random letter;
    ours draws it from a fixed seed, so the verdict never changes between calls."""
    kwargs = {"letter": "#", "let_frequency": 2, "let_relation": "at least"}
    row = {"key": 1122, "prompt": "p", "instruction_id_list": ["keywords:letter_frequency"], "kwargs": [kwargs]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert len(load_rows(str(path))) == 1
    letter = ifeval.build_checker("keywords:letter_frequency", kwargs, "p")._letter
    assert letter.isalpha() and ifeval.build_checker("keywords:letter_frequency", kwargs, "p")._letter == letter
    verdicts = {scoring.instruction_verdicts(row, f"{letter * 3} and more")[0] for _ in range(5)}
    assert verdicts == {(True, True)}
    # a missing letter is still refused: nobody asked for a random constraint there
    assert "lacks an argument" in ifeval.instruction_problem("keywords:letter_frequency", {"let_frequency": 2, "let_relation": "at least"})


@pytest.mark.parametrize("instruction_id, kwargs, expected", [
    ("keywords:existence", {"keywords": "sea"}, "argument 'keywords' must be a list of strings"),
    ("keywords:forbidden_words", {"forbidden_words": ["a", 3]}, "argument 'forbidden_words' must be a list of strings"),
    ("toy:max_chars", {"max_chars": "ten"}, "argument 'max_chars' must be a whole number"),
    ("toy:start_with", {}, "lacks its argument 'char'"),
    ("toy:end_with", {"chr": "!"}, "takes no argument 'chr'"),
    ("toy:task:count", {"text": "abc"}, "lacks its argument 'letter'"),
])
def test_kwargs_of_the_wrong_shape_are_refused_when_rows_load(instruction_id, kwargs, expected, tmp_path):
    row = {"prompt": "p", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"row 0: .*{expected}"):
        load_rows(str(path))


def test_rlvr_around_rows_are_dropped_with_a_count(tmp_path, capsys):
    truth = {"func_name": "validate_word_constraint", "N": 50, "quantifier": "around"}
    with pytest.raises(ifeval.NotScorable, match="row 3: .*'around' 50"):
        ifeval.from_rlvr({"messages": [{"role": "user", "content": "x"}], "ground_truth": json.dumps(truth)}, 3)
    around = {"messages": [{"role": "user", "content": "Say it."}], "ground_truth": json.dumps(truth)}
    lowercase = {**around, "ground_truth": json.dumps({"func_name": "validate_lowercase"})}
    path = tmp_path / "rlvr.jsonl"
    path.write_text(json.dumps(around) + "\n" + json.dumps(lowercase) + "\n")
    assert [r["instruction_id_list"] for r in load_rows(str(path))] == [["change_case:english_lowercase"]]
    assert "dropped 1 of 2 rows" in capsys.readouterr().out
