"""Heuristic filters: each rule's stable reason, the reference order, the config switches, and the pipeline."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from selfinstruct.filters import TOO_SIMILAR, CandidateFilter, Decision
from selfinstruct.filters.heuristics import (
    ALPACA_BLACKLIST,
    SELF_INSTRUCT_BLACKLIST,
    Blacklist,
    Duplicate,
    FilterConfig,
    build_heuristics,
)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("  \n\t ", "empty"),
        ("Summarize this text", "too_short"),
        ("Summarize " + "this " * 149 + "text", "too_long"),
        ("Describe the image in one sentence.", "blacklisted:image"),
        ("Please GO   TO the store and list what you buy.", "blacklisted:go to"),
        ("Compose some music for a birthday party.", "blacklisted:music"),
        ("write a program that sorts a list of numbers.", "write_a_program"),
        ("- List three fruits that are yellow.", "starts_with_punctuation"),
        ("¿Qué hora es ahora mismo por favor?", "starts_with_non_ascii"),
        ("Élaborez un plan de voyage pour deux.", "starts_with_non_ascii"),
    ],
)
def test_each_rule_has_a_stable_reason(text, reason):
    assert build_heuristics(FilterConfig())(text) == reason


def test_reference_boundaries_and_order():
    chain = build_heuristics(FilterConfig())
    assert chain("Summarize this short text") is None  # 4 words pass, 3 do not
    assert chain("Summarize " + "this " * 148 + "text") is None  # 150 words pass
    assert chain("Draw") == "too_short"  # length is checked before the blacklist
    assert chain("Write a program to draw a picture.") == "blacklisted:draw"  # first match in the text
    assert chain("Explain the profile of a mapping function.") is None  # whole words only
    assert chain("   Explain what a file-system journal does.") == "blacklisted:file"


def test_blacklist_presets():
    assert len(SELF_INSTRUCT_BLACKLIST) == 13 and len(ALPACA_BLACKLIST) == 18
    text = "Write a poem about a video you liked."
    assert build_heuristics(FilterConfig())(text) == "blacklisted:video"
    assert build_heuristics(FilterConfig(blacklist="self-instruct"))(text) is None
    custom = FilterConfig(blacklist="none", extra_blacklist=["poem", "you liked"])
    assert build_heuristics(custom)(text) == "blacklisted:poem"
    assert Blacklist(("you liked",))(text) == "blacklisted:you liked"


def test_each_check_can_be_switched_off():
    cases = {
        "check_length": "Summarize it",
        "check_blacklist": "Describe this image in detail please.",
        "check_write_a_program": "Write a program that prints the date.",
        "check_punctuation": "(Optional) explain why the sky is blue.",
        "check_non_ascii": "Éxplain why the sky is blue today.",
    }
    for switch, text in cases.items():
        assert build_heuristics(FilterConfig())(text) is not None
        assert build_heuristics(FilterConfig(**{switch: False}))(text) is None, switch
    assert build_heuristics(FilterConfig(min_words=1, max_words=2))("Summarize it") is None


def test_duplicates_are_normalised_and_remembered_in_order():
    dup = Duplicate(pool=["Name three   colors of the rainbow."])
    assert dup("name three colors of the RAINBOW.") == "duplicate"
    assert dup("List two animals that live in the sea.") is None
    assert dup(" list two animals that live in the sea. ") == "duplicate"
    chain = build_heuristics(FilterConfig(check_duplicate=False))
    assert chain("List two animals that live in the sea.") is None
    assert chain("List two animals that live in the sea.") is None


def test_config_rejects_bad_values_and_unknown_keys():
    with pytest.raises(ValidationError):
        FilterConfig(threshold=1.2)
    with pytest.raises(ValidationError):
        FilterConfig(blacklist="mine")
    with pytest.raises(ValidationError):
        FilterConfig(check_everything=True)
    assert all(f.description for f in FilterConfig.model_fields.values())


def test_candidate_filter_runs_heuristics_then_novelty_in_order():
    seeds = ["Give three tips for staying healthy.", "Translate the sentence into French."]
    filt = CandidateFilter(FilterConfig(nearest_k=2), pool=seeds)
    texts = [
        "Give three tips for staying healthy!",  # near-copy of a seed
        "Describe the story of a famous novel briefly.",
        "Describe the story of a famous novel briefly",  # similar to the candidate kept just before
        "describe the story of a famous novel briefly.",  # exact duplicate (normalised) of a passed text
        "Story",
        "Suggest a name for a small coffee shop.",
    ]
    decisions = filt(texts)
    assert [d.reason for d in decisions] == [TOO_SIMILAR, None, TOO_SIMILAR, "duplicate", "too_short", None]
    assert decisions[0].nearest[0] == (seeds[0], 1.0) and decisions[0].max_f == 1.0
    assert decisions[2].nearest[0] == (texts[1], 1.0)
    assert decisions[4] == Decision(False, "too_short")  # no similarity computed for heuristic rejects
    assert filt.counts == {"kept": 2, TOO_SIMILAR: 2, "duplicate": 1, "too_short": 1}
    assert filt.index is not None and filt.index.texts == [*seeds, texts[1], texts[5]]


def test_candidate_filter_stages_and_resume_pool():
    only_rules = CandidateFilter(novelty=False)
    near_copies = ["Sort these numbers from low to high.", "Sort these numbers low to high."]
    assert [d.keep for d in only_rules(near_copies)] == [True, True]
    only_rouge = CandidateFilter(heuristics=False)
    only_rouge.add_pool(["Sort these numbers from low to high."])
    decision = only_rouge(["Sort"])[0]  # too short for the rules, but they are off
    assert decision.keep and decision.max_f == pytest.approx(2 * 1 / 7 * 1 / (1 / 7 + 1))
