"""Caption metrics against hand-worked values, the Java-free PTB tokenizer, and classification metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest

from seqvision import metrics, ptb
from seqvision.metrics import (
    caption_scores,
    classification_report,
    confusion_matrix,
    score_activity_jsonl,
    score_predictions_jsonl,
    write_metrics,
)
from seqvision.ptb import ptb_tokenize

# coco-caption's smoothing constants (pycocoevalcap/bleu/bleu_scorer.py): every n-gram precision is
# (correct + TINY) / (guess + SMALL), so a missing n-gram order gives a tiny positive BLEU instead of 0.
TINY, SMALL = 1e-15, 1e-9

# ---------------------------------------------------------------------------------------------------------
# Tokenizer. Expected strings are what pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, Java) followed
# by its PUNCTUATIONS filter produced for each caption; test_tokenizer_matches_the_java_original re-derives
# them from the jar whenever Java is installed.

PTB_CASES = [
    ("A man is playing a guitar.", "a man is playing a guitar"),
    ("The dog doesn't want to go outside!", "the dog does n't want to go outside"),
    ("I can't, won't, shouldn't: they're sure we'll go.", "i ca n't wo n't should n't they 're sure we 'll go"),
    ("A woman's hat is on the 3-year-old boy's head.", "a woman 's hat is on the 3-year-old boy 's head"),
    # brackets become -LRB- ...; lowercased they escape the upper-case PUNCTUATIONS list and stay
    (
        "Two people (a man and a woman) are talking [loudly].",
        "two people -lrb- a man and a woman -rrb- are talking -lsb- loudly -rsb-",
    ),
    ('A "big" dog runs, jumps; and barks... loudly', "a big dog runs jumps and barks loudly"),
    (
        "The kids' toys are in Mr. Smith's car at 5 p.m. in the U.S.",
        "the kids toys are in mr. smith 's car at 5 p.m. in the u.s.",
    ),
    ("It costs $3.50 or 10% of 1,000 dollars -- a lot.", "it costs $ 3.50 or 10 % of 1,000 dollars a lot"),
    ("A café in São Paulo — naïve über crème brûlée.", "a café in são paulo naïve über crème brûlée"),
    ("Someone's cat sat on the mat?!", "someone 's cat sat on the mat ?!"),
    (
        "A man wearing a t-shirt and an up-to-date black/white e-mail.",
        "a man wearing a t-shirt and an up-to-date black/white e-mail",
    ),
    ("He cannot stop; gonna dance at 10:30 on 12/25/2013.", "he can not stop gon na dance at 10:30 on 12/25/2013"),
    ("A ½ cup & a £5 note.", "a 1/2 cup & a # 5 note"),
    ("A DOG IS RUNNING ON THE BEACH.", "a dog is running on the beach"),
    ("rock 'n' roll at 5 o'clock, y'all", "rock 'n' roll at 5 o'clock y' all"),
    ("a man playing with a ball", "a man playing with a ball"),
    ("a <unk> dog on a <unk>.", "a <unk> dog on a <unk>"),  # decoded unknown words stay one token
]


@pytest.mark.parametrize(("caption", "expected"), PTB_CASES)
def test_ptb_tokenize_reproduces_coco_caption(caption: str, expected: str) -> None:
    assert ptb_tokenize(caption) == expected


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")
def test_tokenizer_matches_the_java_original(tmp_path) -> None:
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    captions = [c for c, _ in PTB_CASES]
    # One caption per line (as coco-caption writes them), blank lines between so that no caption's
    # end-of-line lookahead sees the next caption.
    (tmp_path / "caps.txt").write_text("\n\n".join(captions), encoding="utf-8")
    out = subprocess.run(
        ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", "caps.txt"],
        cwd=tmp_path, capture_output=True, check=True, timeout=120,
    ).stdout.decode("utf-8")
    lines = [line for line in out.split("\n") if line.strip()]
    java = [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines]
    assert java == [ptb_tokenize(c) for c in captions]
    assert java == [e for _, e in PTB_CASES]


# ---------------------------------------------------------------------------------------------------------
# BLEU, worked by hand


def test_bleu_corpus_level_with_brevity_penalty_and_missing_4gram() -> None:
    hyps = {"a": "A man rides a horse.", "b": "a dog runs"}
    refs = {
        "a": ["a man rides the brown horse", "a person is riding a horse"],
        "b": ["a dog runs", "the dog is running fast"],
    }
    # Item a, hypothesis "a man rides a horse" (5 words), references of 6 and 6 words -> closest ref len 6.
    #   1-grams: a x2 (clipped by ref 2's two a's: 2), man, rides, horse      -> 5 correct / 5
    #   2-grams: a man (r1), man rides (r1), rides a (none), a horse (r2)      -> 3 / 4
    #   3-grams: a man rides (r1), man rides a, rides a horse                  -> 1 / 3
    #   4-grams: a man rides a, man rides a horse                              -> 0 / 2
    # Item b, "a dog runs" (3 words), refs of 3 and 5 words -> closest 3.
    #   1-grams 3/3, 2-grams 2/2, 3-grams 1/1, 4-grams 0/0 (guess = max(0, 3 - 4 + 1) = 0)
    # Corpus totals (coco-caption sums counts over items, it does not average sentence BLEU):
    correct, guess = [8, 5, 2, 0], [8, 6, 4, 2]
    test_len, ref_len = 5 + 3, 6 + 3
    # brevity penalty: ratio = 8/9 < 1 -> exp(1 - 1/ratio) = exp(1 - 9/8) = exp(-0.125) ~= 0.8825
    bp = math.exp(1 - (ref_len + SMALL) / (test_len + TINY))
    expected = []
    product = 1.0
    for n in range(4):
        product *= (correct[n] + TINY) / (guess[n] + SMALL)
        expected.append(product ** (1 / (n + 1)) * bp)
    # BLEU-1 = bp, BLEU-2 = sqrt(5/6) bp, BLEU-3 = (5/6 * 2/4)^(1/3) bp,
    # BLEU-4 = (5/6 * 2/4 * 1e-15/2)^(1/4) bp ~= 1.06e-4: tiny but not 0, coco-caption's zero-count handling.
    assert expected[0] == pytest.approx(math.exp(-0.125), rel=1e-9)
    assert expected[3] == pytest.approx((5 / 6 * 2 / 4 * 1e-15 / 2) ** 0.25 * math.exp(-0.125), rel=1e-6)

    scores = caption_scores(hyps, refs, meteor="never")
    got = [scores[f"bleu_{n}"] for n in range(1, 5)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert 0 < scores["bleu_4"] < 2e-4


# ---------------------------------------------------------------------------------------------------------
# CIDEr-D, recomputed with numpy from its definition (Vedantam et al. 2015, and coco-caption's CIDEr-D:
# idf from the references of the evaluated corpus, tf-idf vectors per n-gram order, clipped cosine
# similarity, Gaussian length penalty sigma = 6, mean over n = 1..4 and over references, times 10).

CIDER_HYPS = {"x": "a man rides a horse", "y": "a dog a dog runs", "z": "two cats sleep"}
CIDER_REFS = {
    "x": ["a man rides a brown horse", "a person rides a horse"],
    "y": ["a dog runs on grass", "the dog runs"],
    "z": ["two cats sleep on a bed", "a pair of cats sleeping"],
}


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _cider_d_numpy(hyps: dict[str, str], refs: dict[str, list[str]], sigma: float = 6.0) -> float:
    keys = sorted(hyps)
    num_items = len(keys)
    per_item = np.zeros((num_items, 4))  # [item, n-1] -> mean over references of sim_n
    for n in range(1, 5):
        # document frequency: in how many items' reference sets each n-gram occurs
        df: Counter = Counter()
        for key in keys:
            df.update(set().union(*(_ngrams(r.split(), n) for r in refs[key])))
        vocab = sorted(set(df) | {g for k in keys for g in _ngrams(hyps[k].split(), n)})
        column = {g: i for i, g in enumerate(vocab)}
        idf = np.array([np.log(num_items) - np.log(max(1.0, df[g])) for g in vocab])

        def tfidf(sentence: str) -> np.ndarray:
            v = np.zeros(len(vocab))
            for g, count in _ngrams(sentence.split(), n).items():
                v[column[g]] = count
            return v * idf

        for i, key in enumerate(keys):
            h = tfidf(hyps[key])
            sims = []
            for r_text in refs[key]:
                r = tfidf(r_text)
                num = np.sum(np.minimum(h, r) * r)  # CIDEr-D clips the hypothesis weights at the reference's
                denom = np.linalg.norm(h) * np.linalg.norm(r)
                sim = num / denom if denom > 0 else 0.0
                # length penalty; pycocoevalcap measures length in bigrams (words - 1), the same difference
                delta = len(hyps[key].split()) - len(r_text.split())
                sims.append(sim * np.exp(-(delta**2) / (2 * sigma**2)))
            per_item[i, n - 1] = np.mean(sims)
    return float(np.mean(10.0 * per_item.mean(axis=1)))


def test_cider_d_matches_an_independent_numpy_computation() -> None:
    expected = _cider_d_numpy(CIDER_HYPS, CIDER_REFS)
    # e.g. idf of "a" is log(3/3) = 0 (every item's references contain it); of "horse", log(3/1).
    assert 0.5 < expected < 10
    got = caption_scores(CIDER_HYPS, CIDER_REFS, meteor="never")["cider_d"]
    assert got == pytest.approx(expected, rel=1e-9)
    assert metrics.cider_d(CIDER_HYPS, CIDER_REFS) == got  # the validation metric: the same number, bit for bit

    # Clipping is active: without np.minimum the repeated "a dog" of item y would score higher.
    unclipped = dict(CIDER_HYPS, y="a dog runs")
    assert caption_scores(unclipped, CIDER_REFS, meteor="never")["cider_d"] == pytest.approx(
        _cider_d_numpy(unclipped, CIDER_REFS), rel=1e-9
    )


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L, one pair by hand


def test_rouge_l_one_pair_by_hand() -> None:
    # hyp "a man rides a horse" (5), ref "a man is riding a brown horse" (7)
    # LCS = "a man a horse" = 4  ->  P = 4/5, R = 4/7
    # F = (1 + b^2) P R / (R + b^2 P) with coco-caption's beta = 1.2
    p, r, b2 = 4 / 5, 4 / 7, 1.2**2
    expected = (1 + b2) * p * r / (r + b2 * p)  # = 2.44 * 0.8 * 0.571429 / (0.571429 + 1.152) = 0.647215
    got = caption_scores({"1": "a man rides a horse"}, {"1": ["a man is riding a brown horse"]}, meteor="never")
    assert got["rouge_l"] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.647215, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Files, METEOR, errors


def test_predictions_jsonl_to_metrics_json_equals_direct_call(tmp_path) -> None:
    records = [
        {"id": "v1", "hypothesis": "A man rides a horse.", "references": CIDER_REFS["x"], "score": -3.2},
        {"id": "v2", "hypothesis": "a dog a dog runs", "references": CIDER_REFS["y"], "score": -4.0},
        {"id": "v3", "hypothesis": "Two cats sleep!", "references": CIDER_REFS["z"], "score": -1.5},
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    from_file = score_predictions_jsonl(path, meteor="never")
    direct = caption_scores(
        {r["id"]: r["hypothesis"] for r in records}, {r["id"]: r["references"] for r in records}, meteor="never"
    )
    assert from_file == {**direct, "num_items": 3}

    out = tmp_path / "eval" / "metrics.json"
    write_metrics(out, from_file)
    assert json.loads(out.read_text()) == from_file
    assert json.loads(out.read_text())["meteor"] is None
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_meteor_reported_unavailable_without_java(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    hyps, refs = {"1": "a dog runs"}, {"1": ["a dog runs fast"]}
    assert caption_scores(hyps, refs)["meteor"] is None
    assert caption_scores(hyps, refs, meteor="never")["meteor"] is None
    with pytest.raises(RuntimeError, match="Java"):
        caption_scores(hyps, refs, meteor="always")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")
def test_meteor_with_java() -> None:
    """Both sets in one Java process (its start is ~5 s); caption_scores' own METEOR call is compared with scoring
    alone in tests/test_report.py."""
    imperfect = [{"id": k, "hypothesis": h, "references": CIDER_REFS[k]} for k, h in CIDER_HYPS.items()]
    perfect = [{"id": "1", "hypothesis": "a dog runs", "references": ["a dog runs"]}]
    scores = metrics.meteor_scores({"imperfect": metrics.tokenized_corpus(imperfect),
                                    "perfect": metrics.tokenized_corpus(perfect)})
    assert 0.0 < scores["imperfect"] < 1.0
    assert scores["perfect"] > scores["imperfect"]


def test_caption_scores_reject_mismatched_ids() -> None:
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({"1": "a"}, {"2": ["a"]}, meteor="never")
    with pytest.raises(ValueError, match="without references"):
        caption_scores({"1": "a"}, {"1": []}, meteor="never")


# ---------------------------------------------------------------------------------------------------------
# Classification

NAMES = ["left", "right", "up", "down", "still"]
PAIRS = [("left", "right"), ("up", "down")]


def test_accuracy_and_confusion_are_consistent() -> None:
    rng = np.random.default_rng(0)
    num_items, num_classes = 40, 7
    labels = rng.integers(0, num_classes, num_items)
    logits = rng.normal(size=(num_items, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    names = [f"c{i}" for i in range(num_classes)]
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, :5]  # what evaluate.predict_activity writes as "topk"
    report = classification_report(labels, ranked[:, 0], class_names=names, topk=ranked)

    confusion = np.array(report["confusion"])
    predicted = logits.argmax(axis=1)
    assert confusion.trace() / num_items == pytest.approx(report["top_1"])
    assert report["top_1"] == pytest.approx(np.mean(predicted == labels))
    assert confusion.sum(axis=1).tolist() == np.bincount(labels, minlength=num_classes).tolist()  # rows = true
    assert confusion.sum(axis=0).tolist() == np.bincount(predicted, minlength=num_classes).tolist()  # cols = pred
    top5 = np.mean([labels[i] in np.argsort(-logits[i])[:5] for i in range(num_items)])
    assert report["top_5"] == pytest.approx(top5)
    assert report["top_5"] >= report["top_1"]
    assert 0 < report["top_1"] < report["top_5"] < 1  # the case is not degenerate


def test_mean_class_and_reversal_pair_accuracy_by_hand() -> None:
    # true:  left left left right right up   down  still still still
    # pred:  left right left left  right up  up    still still left
    labels = [0, 0, 0, 1, 1, 2, 3, 4, 4, 4]
    predicted = [0, 1, 0, 0, 1, 2, 2, 4, 4, 0]
    report = classification_report(labels, predicted, class_names=NAMES, reversal_pairs=PAIRS)
    # per class: left 2/3, right 1/2, up 1/1, down 0/1, still 2/3
    assert report["per_class_accuracy"] == pytest.approx(
        {"left": 2 / 3, "right": 1 / 2, "up": 1.0, "down": 0.0, "still": 2 / 3}
    )
    assert report["top_1"] == pytest.approx(6 / 10)
    assert report["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 0 + 2 / 3) / 5)
    # clips whose true class is in a pair: the first 7 (left x3, right x2, up, down); correct: 2 + 1 + 1 + 0
    assert report["reversal_pair_accuracy"] == pytest.approx(4 / 7)
    # predicted as the time-reversed partner: left->right once, right->left once, down->up once
    assert report["reversal_swap_rate"] == pytest.approx(3 / 7)
    assert report["top_5"] is None
    assert report["confusion"][0] == [2, 1, 0, 0, 0]


def test_per_class_accuracy_of_an_absent_class_is_none_and_excluded_from_the_mean() -> None:
    report = classification_report([0, 0, 1], [0, 1, 1], class_names=["a", "b", "c"])
    assert report["per_class_accuracy"]["c"] is None
    assert report["mean_class_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert report["reversal_pair_accuracy"] is None
    with pytest.raises(ValueError, match="unknown class"):
        classification_report([0], [0], class_names=["a", "b"], reversal_pairs=[("a", "z")])


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix([0, 3], [0, 1], 3)


def test_activity_jsonl_equals_direct_report(tmp_path) -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(12, len(NAMES)))
    labels = rng.integers(0, len(NAMES), 12)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    direct = classification_report(labels, ranked[:, 0], class_names=NAMES, reversal_pairs=PAIRS, topk=ranked)
    lines = [
        {
            "id": f"clip{i}",
            "predicted": NAMES[ranked[i, 0]],
            "label": NAMES[labels[i]],
            "score": float(scores[i, ranked[i, 0]]),
            "topk": [NAMES[j] for j in ranked[i]],
        }
        for i in range(12)
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert score_activity_jsonl(path, class_names=NAMES, reversal_pairs=PAIRS) == direct
