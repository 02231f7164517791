"""The novelty index must make exactly the decisions (and report exactly the F values) of rouge-score 0.1.2."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, tokenizers

from selfinstruct.filters.rouge import (
    EmptyTokensWarning,
    NoveltyIndex,
    _fmeasure_array,
    make_tokenizer,
    rouge_fmeasure,
)

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
STEM_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

# Few distinct words make overlaps, repeated tokens and exact ties frequent; the rest is adversarial noise.
WORDS = ["the", "a", "of", "write", "story", "poem", "Cat", "cats", "running", "runs", "x1", "42", "naïve"]
NOISE = ["", " ", "  ", "!", "?!", "...", "—", "«»", "日本語", "é", "-", "\n", "_", "ǅ", "İ", "K"]
word_lists = st.lists(st.sampled_from(WORDS + NOISE), max_size=14)
texts = word_lists.map(" ".join) | st.text(max_size=40)


def reference_run(pool: list[str], candidates: list[str], threshold: float, top_k: int, scorer=SCORER):
    """The reference semantics, pair by pair: each kept candidate joins the pool before the next one."""
    pool = list(pool)
    out = []
    for cand in candidates:
        scores = [scorer.score(cand, p)["rougeL"].fmeasure for p in pool]
        max_f = max(scores, default=0.0)
        ranked = sorted((i for i, f in enumerate(scores) if f > 0), key=lambda i: (-scores[i], i))
        nearest = [(pool[i], scores[i]) for i in ranked[:top_k]]
        mean = sum(scores) / len(scores) if scores else 0.0
        keep = not max_f > threshold
        out.append((keep, max_f, nearest, mean))
        if keep:
            pool.append(cand)
    return out


def assert_same(ours, ref, check_mean=False):
    assert len(ours) == len(ref)
    for i, (res, (keep, max_f, nearest, mean)) in enumerate(zip(ours, ref, strict=True)):
        assert (res.keep, res.max_f, res.nearest) == (keep, max_f, nearest), f"candidate {i}"
        if check_mean:
            assert res.mean_f == pytest.approx(mean, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- tokenizer and formula


@settings(max_examples=300, deadline=None)
@given(texts)
def test_tokenizer_matches_rouge_score(text):
    assert make_tokenizer("rouge")(text) == tokenizers.DefaultTokenizer(use_stemmer=False).tokenize(text)


@settings(max_examples=300, deadline=None)
@given(
    texts
    | st.lists(st.sampled_from(["generalization", "flies", "ies", "dying", "a1b2", "sky"])).map(" ".join)
)
def test_stemming_tokenizer_matches_rouge_score(text):
    assert make_tokenizer("rouge", use_stemmer=True)(text) == tokenizers.DefaultTokenizer(True).tokenize(text)


def test_unicode_tokenizer_keeps_letters_and_splits_cjk():
    tok = make_tokenizer("unicode")
    assert tok("Café naïve_test, 日本語です!") == ["café", "naïve", "test", "日", "本", "語", "で", "す"]
    assert make_tokenizer("rouge")("Café 日本語") == ["caf"]


@settings(max_examples=300, deadline=None)
@given(word_lists, word_lists)
def test_fmeasure_matches_score_lcs_and_is_symmetric(a, b):
    ta, tb = make_tokenizer()(" ".join(a)), make_tokenizer()(" ".join(b))
    ref = rouge_scorer._score_lcs(ta, tb).fmeasure  # target = new text, prediction = existing text
    assert ref == rouge_scorer._score_lcs(tb, ta).fmeasure  # which side is the target does not matter
    lcs = len(rouge_scorer._backtrack_norec(rouge_scorer._lcs_table(ta, tb), ta, tb)) if ta and tb else 0
    assert rouge_fmeasure(lcs, len(ta), len(tb)) == ref


def test_ties_at_threshold_follow_the_float_formula():
    assert rouge_fmeasure(7, 7, 13) == 0.7000000000000001 == rouge_fmeasure(7, 13, 7)
    assert rouge_fmeasure(7, 10, 10) == 0.7
    seven = "one two three four five six seven"
    cases = [(seven, seven + " a b c d e f", False), (seven + " a b c", seven + " d e f", True)]
    for new, old, keep in cases:
        res = NoveltyIndex.from_texts([old]).query([new])[0]
        assert res.max_f == SCORER.score(new, old)["rougeL"].fmeasure
        assert res.keep is keep
    # 2L/(m+n) is algebraically equal but rounds differently on exactly these ties.
    assert 2 * 7 / (7 + 13) == 0.7 != rouge_fmeasure(7, 7, 13)


def test_float_fmeasure_is_strictly_increasing_in_lcs():
    """Pruning with F(overlap) >= F(LCS) relies on this; check every (L, m, n) with m, n <= 300."""
    lcs, n = np.arange(1, 301)[:, None], np.arange(1, 301)[None, :]
    for m in range(1, 301):
        valid = lcs <= np.minimum(m, n)
        f = np.where(valid, _fmeasure_array(lcs.astype(float), m, n.astype(float)), 2.0 + lcs)
        assert (np.diff(f, axis=0) > 0).all()
    assert _fmeasure_array(np.array([7]), 7, np.array([13]))[0] == rouge_fmeasure(7, 7, 13)


# ---------------------------------------------------------------- index vs brute force


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(texts, max_size=12),
    st.lists(texts, min_size=1, max_size=12),
    st.sampled_from([0.7, 0.7, 0.5, 0.0, 1.0, 0.6666666666666666, 0.7000000000000001]),
    st.integers(1, 6),
)
def test_random_and_adversarial_strings_match_brute_force(pool, candidates, threshold, batch_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyTokensWarning)
        index = NoveltyIndex.from_texts(pool, threshold=threshold, top_k=3, batch_size=batch_size)
        ours = index.query(candidates)
    assert_same(ours, reference_run(pool, candidates, threshold, top_k=3))


def _near_duplicates(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(60)] + ["the", "a", "of", "to", "and", "following", "write"] * 8
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.4:
            words = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(len(words))
                if rng.random() < 0.5:
                    words[pos] = rng.choice(vocab)
                else:
                    words.insert(pos, rng.choice(vocab))
        else:
            words = rng.choices(vocab, k=rng.randint(1, 16))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "", "!"]))
    return out


@pytest.mark.parametrize("batch_size", [1, 16, 1000])
def test_sequential_filtering_matches_brute_force(batch_size):
    texts = _near_duplicates(400, seed=batch_size)
    seeds, candidates = texts[:40], texts[40:]
    index = NoveltyIndex.from_texts(seeds, top_k=10, compute_mean=True, batch_size=batch_size)
    ours = index.query(candidates)
    ref = reference_run(seeds, candidates, 0.7, top_k=10)
    assert_same(ours, ref, check_mean=True)
    assert 0 < sum(r.keep for r in ours) < len(ours)  # the data exercises both outcomes
    assert index.texts == seeds + [c for c, r in zip(candidates, ours, strict=True) if r.keep]


@pytest.mark.parametrize(("top_k", "mean"), [(0, False), (10, False), (2, True)])
def test_frequent_keys_as_mask_bits_stay_exact(top_k, mean):
    """With a low promotion threshold most keys become mask bits; results must not change."""
    texts = _near_duplicates(500, seed=7)
    index = NoveltyIndex(top_k=top_k, compute_mean=mean, batch_size=32)
    index.frequent_df = 5
    index.add(texts[:200])
    assert len(index._bits) == 64
    ours = index.query(texts[200:])
    assert_same(ours, reference_run(texts[:200], texts[200:], 0.7, top_k=top_k), check_mean=mean)
    assert (ours[0].mean_f is None) is not mean


def test_many_keys_reaching_the_promotion_threshold_at_once():
    """Regression: 100 keys qualify for the 64 mask bits in one `add`; the extra ones must stay postings."""
    words = [f"w{i}" for i in range(100)]
    pool = [" ".join(words), " ".join(reversed(words)), "w1 w2 w3 other words here"]
    index = NoveltyIndex(top_k=3)
    index.frequent_df = 2
    index.add(pool)
    assert len(index._bits) == 64
    cands = [" ".join(words[:60]), "w99 w98 w97 w5 w4 fresh", "completely unrelated text"]
    assert_same(index.query(cands), reference_run(pool, cands, 0.7, top_k=3))


def test_kept_candidates_join_the_pool_within_a_batch():
    index = NoveltyIndex()
    a, b = "Write a short poem about the sea.", "Write a short poem about the sea!"
    first, second = index.query([a, b])
    assert first.keep and first.nearest == []
    assert not second.keep and second.nearest == [(a, 1.0)]
    assert index.texts == [a]
    # Without add_kept every candidate is judged against the pool alone and nothing joins it.
    assert [r.keep for r in NoveltyIndex().query([a, b], add_kept=False)] == [True, True]


def test_rebuild_from_texts_gives_the_same_answers():
    texts = _near_duplicates(300, seed=3)
    grown = NoveltyIndex(batch_size=7)
    grown.query(texts[:200])
    rebuilt = NoveltyIndex.from_texts(grown.texts)
    assert grown.query(texts[200:], add_kept=False) == rebuilt.query(texts[200:], add_kept=False)


def test_stemmer_option_is_exact():
    texts = ["Running dogs are jumping over fences", "The runner ran over the fence", "Dog runs", "Jumps"]
    cands = ["run dog jump over fence", "running runner", "Dogs run!"]
    index = NoveltyIndex.from_texts(texts, use_stemmer=True, threshold=0.5)
    ours = index.query(cands)
    assert_same(ours, reference_run(texts, cands, 0.5, top_k=10, scorer=STEM_SCORER))
    assert not ours[0].keep and NoveltyIndex.from_texts(texts, threshold=0.5).query(cands[:1])[0].keep


def test_empty_token_candidates_warn_once_and_are_kept():
    index = NoveltyIndex.from_texts(["日本語のテキスト", "a b c"])
    with pytest.warns(EmptyTokensWarning, match="no ROUGE tokens"):
        results = index.query(["日本語のテキスト", "?!"])
    assert [(r.keep, r.max_f, r.nearest) for r in results] == [(True, 0.0, [])] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.query(["…"])
    unicode = NoveltyIndex.from_texts(["日本語のテキスト"], tokenizer="unicode")
    assert not unicode.query(["日本語のテキストです"])[0].keep


def test_bad_settings_are_rejected():
    for kwargs in ({"threshold": 1.5}, {"top_k": -1}, {"batch_size": 0}, {"tokenizer": "words"}):
        with pytest.raises(ValueError):
            NoveltyIndex(**kwargs)
