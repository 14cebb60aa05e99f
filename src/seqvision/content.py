"""Content metrics for the synthetic benchmark: what a caption says, checked against what the generator drew.

CIDEr-D and BLEU score n-gram overlap with the references; on the synthetic benchmark the grammar is known
(``seqvision.synth.captions``), so a caption can be parsed into what it claims and compared with
``data/annotations/metadata.json``:

- images: the objects named (colour + shape; size scored separately), the pairwise relations, the region of
  a lone object;
- videos: the events named (object + verb class, and the new colour of ``change_color``) and their order.

The parser reads the generator's phrases (``VERB_PHRASES``, ``RELATION_PHRASES``, ``REGION_PHRASES``, plus the
synonyms and gerunds of earlier versions) in any order, resolves "it" to the previous event's object, and skips words
it does not know, so a model's imperfect sentence still yields what it does say. A noun phrase is
``[size] colour shape``; a colour alone is not an object mention.

Scores come per item (counts and rates) and for the corpus as micro averages (counts summed over items, then
divided), so ``summarize`` on a bootstrap resample of ``per_item`` reproduces the corpus numbers' estimator.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from seqvision.synth.captions import (
    IMAGE_OPENINGS,
    REGION_PHRASES,
    RELATION_PHRASES,
    VERB_PHRASES,
    VIDEO_OPENINGS,
    Mention,
    image_captions,
    video_captions,
)
from seqvision.synth.scene import COLORS, INVERSE_RELATION, SHAPES, SIZES, ObjectSpec

Thing = tuple[str, str]  # (colour, shape): colours are unique within a scene, so this names one object

# Relation synonyms the parser accepts beyond the generator's current ones (earlier versions, plain English).
_EXTRA_RELATIONS = {
    "left of": ("to the left of", "on the left of"),
    "right of": ("to the right of", "on the right of"),
    "above": ("over",),
    "below": ("beneath", "lower than"),
}
# Verb phrases the parser accepts beyond the generator's one per class: the synonyms and gerunds of earlier
# versions (present tense and gerund each), so captions in those words still count.
_EXTRA_VERBS: dict[str, tuple[str, ...]] = {
    "move_left": ("moving left", "moves to the left", "moving to the left", "slides to the left",
                  "sliding to the left", "goes left", "going left"),
    "move_right": ("moving right", "moves to the right", "moving to the right", "slides to the right",
                   "sliding to the right", "goes right", "going right"),
    "move_up": ("moving up", "rises", "rising", "goes up", "going up", "slides upward", "sliding upward"),
    "move_down": ("moving down", "drops", "dropping", "goes down", "going down", "slides downward",
                  "sliding downward"),
    "grow": ("growing", "gets bigger", "getting bigger", "expands", "expanding", "grows larger", "growing larger"),
    "shrink": ("shrinking", "gets smaller", "getting smaller", "contracts", "contracting", "becomes smaller",
               "becoming smaller"),
    "rotate": ("rotating", "spins", "spinning", "rotates in place", "rotating in place", "twists around",
               "twisting around"),
    "appear": ("appearing", "fades in", "fading in", "shows up", "showing up", "comes into view",
               "coming into view"),
    "disappear": ("disappearing", "fades out", "fading out", "vanishes", "vanishing", "fades away", "fading away"),
    "change_color": ("turning {new}", "changes color to {new}", "changing color to {new}", "becomes {new}",
                     "becoming {new}", "changes from {old} to {new}", "changing from {old} to {new}"),
    "bounce": ("bouncing", "jumps", "jumping", "hops up and down", "hopping up and down", "bounces up and down",
               "bouncing up and down"),
    "stay_still": ("staying still", "does not move", "not moving", "remains still", "remaining still",
                   "stays in place", "staying in place"),
}
_COPULAS = frozenset({"is", "are", "being", "also"})


class ObjectMention(NamedTuple):
    color: str
    shape: str
    size: str | None  # None: no size word


class RelationMention(NamedTuple):
    """``subject`` is ``relation`` ``object``, normalised so that ``subject < object`` (by colour)."""

    subject: Thing
    relation: str
    object: Thing


class EventMention(NamedTuple):
    color: str | None  # the object's colour at the event's start; None when the caption names no object
    shape: str | None
    cls: str
    new_color: str | None  # change_color only


class ImageContent(NamedTuple):
    objects: tuple[ObjectMention, ...]  # one per (colour, shape), in order of first mention
    relations: frozenset[RelationMention]
    regions: frozenset[tuple[Thing, str]]  # (object, 3x3 grid cell)


class VideoContent(NamedTuple):
    events: tuple[EventMention, ...]  # in the order the caption tells them


class ContentScores(NamedTuple):
    """``per_item[id]``: counts and rates of one item (rates None when undefined); ``mean``: micro averages
    over every item; ``subsets[name]``: the same over a subset (images: compositional / non_compositional,
    videos: multi_event / single_event)."""

    per_item: dict[str, dict[str, Any]]
    mean: dict[str, float | None]
    subsets: dict[str, dict[str, float | None]]


# --------------------------------------------------------------------------------------------------------
# The ground truth


# --------------------------------------------------------------------------------------------------------
# Parsing


class _Token(NamedTuple):
    kind: str  # "np", "rel", "region", "verb", "it", "word"
    value: Any
    start: int  # index of the first word


_SLOT = re.compile(r"\{(old|new)\}")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _phrase_table(kind: Literal["image", "video"]) -> list[tuple[list[str], str, Any]]:
    """(words, token kind, value) for every phrase of ``kind``'s grammar, longest first. A ``{new}`` or
    ``{old}`` word matches any colour."""
    table: list[tuple[list[str], str, Any]] = []
    if kind == "image":
        for rel, phrases in RELATION_PHRASES.items():
            for phrase in (*phrases, *_EXTRA_RELATIONS.get(rel, ())):
                table.append((phrase.split(), "rel", rel))
        for cell, phrase in REGION_PHRASES.items():
            table.append((phrase.split(), "region", cell))
    else:
        for cls, phrase in VERB_PHRASES.items():
            for form in (phrase, *_EXTRA_VERBS.get(cls, ())):
                table.append((form.split(), "verb", cls))
    return sorted(table, key=lambda row: -len(row[0]))


_TABLES = {kind: _phrase_table(kind) for kind in ("image", "video")}


def _match(words: list[str], i: int, pattern: list[str]) -> dict[str, str] | None:
    """Slot values ({"new": colour, ...}) when ``pattern`` matches ``words`` at ``i``, else None."""
    if i + len(pattern) > len(words):
        return None
    slots = {}
    for word, want in zip(words[i:], pattern):
        slot = _SLOT.fullmatch(want)
        if slot:
            if word not in COLORS:
                return None
            slots[slot.group(1)] = word
        elif word != want:
            return None
    return slots


def _noun_phrase(words: list[str], i: int) -> tuple[ObjectMention, int] | None:
    """``[size] colour shape`` at ``i``: (mention, number of words) or None."""
    size = words[i] if i < len(words) and words[i] in SIZES else None
    j = i + (size is not None)
    if j + 1 < len(words) and words[j] in COLORS and words[j + 1] in SHAPES:
        return ObjectMention(words[j], words[j + 1], size), j + 2 - i
    return None


def _scan(text: str, kind: Literal["image", "video"]) -> list[_Token]:
    words, out, i = _words(text), [], 0
    while i < len(words):
        phrase = None
        for pattern, token_kind, value in _TABLES[kind]:
            slots = _match(words, i, pattern)
            if slots is not None:
                phrase = (_Token(token_kind, (value, slots.get("new")), i), len(pattern))
                break
        noun = _noun_phrase(words, i)
        if noun is not None and (phrase is None or noun[1] > phrase[1]):
            out.append(_Token("np", noun[0], i))
            i += noun[1]
        elif phrase is not None:
            out.append(phrase[0])
            i += phrase[1]
        else:
            out.append(_Token("it" if words[i] == "it" else "word", words[i], i))
            i += 1
    return out


def _normalised(subject: Thing, relation: str, obj: Thing) -> RelationMention:
    if obj < subject:
        return RelationMention(obj, INVERSE_RELATION[relation], subject)
    return RelationMention(subject, relation, obj)


def parse_image_caption(text: str) -> ImageContent:
    """What an image caption claims: objects, relations ``subject relation object`` and regions.

    A relation's subject is the noun phrase just before it ("a red circle [is] left of a blue square"), or,
    when "and" comes right before the relation, the previous relation's subject ("... and above a green
    triangle"); "it" also stands for the previous subject. Its object is the next noun phrase. A region
    phrase belongs to the noun phrase before it, or after it when none came before.
    """
    tokens = _scan(text, "image")
    objects: dict[Thing, ObjectMention] = {}
    relations: set[RelationMention] = set()
    regions: set[tuple[Thing, str]] = set()
    last_np: Thing | None = None
    last_subject: Thing | None = None
    pending_region: str | None = None
    for n, token in enumerate(tokens):
        if token.kind == "np":
            mention: ObjectMention = token.value
            thing = (mention.color, mention.shape)
            known = objects.get(thing)
            if known is None or (known.size is None and mention.size is not None):
                objects[thing] = mention if known is None else known._replace(size=mention.size)
            last_np = thing
            if pending_region is not None:
                regions.add((thing, pending_region))
                pending_region = None
        elif token.kind == "region":
            if last_np is not None:
                regions.add((last_np, token.value[0]))
            else:
                pending_region = token.value[0]
        elif token.kind == "rel":
            before = [t for t in tokens[:n] if not (t.kind == "word" and t.value in _COPULAS)]
            after_and = bool(before) and before[-1].kind == "word" and before[-1].value == "and"
            pronoun = bool(before) and before[-1].kind == "it"
            subject = last_subject if (after_and or pronoun) and last_subject is not None else last_np
            obj = next((t.value for t in tokens[n + 1 :] if t.kind == "np"), None)
            if subject is None or obj is None:
                continue
            obj_thing = (obj.color, obj.shape)
            if obj_thing != subject:
                relations.add(_normalised(subject, token.value[0], obj_thing))
            last_subject = subject
    return ImageContent(tuple(objects.values()), frozenset(relations), frozenset(regions))


def parse_video_caption(text: str) -> VideoContent:
    """The events a video caption tells, in the order it tells them (the grammar always tells events in
    temporal order; a sentence like "Y after X", which it never uses, counts as Y first). An event's object is
    the noun phrase since the previous verb; without one, or with "it", the previous event's object (in its
    colour after a change_color)."""
    events: list[EventMention] = []
    subject: tuple[str | None, str | None] | None = None
    for token in _scan(text, "video"):
        if token.kind == "np":
            subject = (token.value.color, token.value.shape)
        elif token.kind == "it":
            subject = None
        elif token.kind == "verb":
            cls, new_color = token.value
            if subject is None:
                if events:
                    last = events[-1]
                    subject = (last.new_color or last.color, last.shape)
                else:
                    subject = (None, None)
            events.append(EventMention(subject[0], subject[1], cls, new_color if cls == "change_color" else None))
            subject = None
    return VideoContent(tuple(events))


def image_truth(meta: Mapping[str, Any]) -> ImageContent:
    """The content of an ImageMeta (metadata.json) in the parser's terms; a lone object's region included."""
    objs = meta["objects"]
    things = [(o["color"], o["shape"]) for o in objs]
    relations = frozenset(
        _normalised(things[r["subject"]], r["relation"], things[r["object"]]) for r in meta["relations"]
    )
    regions = frozenset({(things[0], objs[0]["region"])}) if len(objs) == 1 else frozenset()
    return ImageContent(tuple(ObjectMention(o["color"], o["shape"], o["size"]) for o in objs), relations, regions)


def video_truth(meta: Mapping[str, Any]) -> VideoContent:
    """The events of a VideoMeta, in temporal order: object by its colour at the event's start and shape."""
    shapes = [o["shape"] for o in meta["objects"]]
    return VideoContent(
        tuple(
            EventMention(
                e["color_before"], shapes[e["object"]], e["class"],
                e["color_after"] if e["class"] == "change_color" else None,
            )
            for e in meta["events"]
        )
    )


# --------------------------------------------------------------------------------------------------------
# Scoring


# rate name -> (numerator count, denominator count)
_RATES: dict[str, tuple[str, str]] = {
    "object_precision": ("objects_matched", "objects_named"),
    "object_recall": ("objects_matched", "objects_present"),
    "size_accuracy": ("sizes_correct", "sizes_named"),
    "relation_precision": ("relations_correct", "relations_named"),
    "relation_recall": ("relations_correct", "relations_present"),
    "region_accuracy": ("regions_correct", "regions_present"),
    "event_precision": ("events_matched", "events_named"),
    "event_recall": ("events_matched", "events_present"),
    "order_accuracy": ("pairs_in_order", "pairs_matched"),
    "main_event_recall": ("main_event_named", "items"),
}
_F1 = {"object_f1": ("object_precision", "object_recall"), "relation_f1": ("relation_precision", "relation_recall"),
       "event_f1": ("event_precision", "event_recall")}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _rates(counts: Mapping[str, float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, (num, den) in _RATES.items():
        if num in counts and den in counts:
            out[name] = _ratio(counts[num], counts[den])
    for name, (p, r) in _F1.items():
        if p in out:
            precision, recall = out[p], out[r]
            if precision is None or recall is None:
                out[name] = None
            else:
                out[name] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return out


def summarize(items: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """Micro averages of per-item records (``ContentScores.per_item`` values): counts summed, then the rates.
    A rate whose denominator sums to 0 is None."""
    totals: Counter[str] = Counter()
    for item in items:
        for key, value in item.items():
            if key in _COUNT_KEYS:
                totals[key] += value
    return _rates(totals)


_COUNT_KEYS = frozenset({k for pair in _RATES.values() for k in pair})


def image_item_scores(hypothesis: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Counts and rates of one image caption against its ImageMeta."""
    said, truth = parse_image_caption(hypothesis), image_truth(meta)
    present = {(o.color, o.shape): o for o in truth.objects}
    matched = [m for m in said.objects if (m.color, m.shape) in present]
    sized = [m for m in matched if m.size is not None]
    counts = {
        "items": 1,
        "objects_named": len(said.objects),
        "objects_present": len(present),
        "objects_matched": len(matched),
        "sizes_named": len(sized),
        "sizes_correct": sum(m.size == present[(m.color, m.shape)].size for m in sized),
        "relations_named": len(said.relations),
        "relations_present": len(truth.relations),
        "relations_correct": len(said.relations & truth.relations),
        "regions_present": len(truth.regions),
        "regions_correct": len(said.regions & truth.regions),
    }
    return {**counts, **_rates(counts), "compositional": bool(meta.get("compositional", False))}


def _event_key(e: EventMention) -> tuple:
    return (e.color, e.shape, e.cls, e.new_color)


def video_item_scores(hypothesis: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Counts and rates of one video caption against its VideoMeta.

    A named event matches a true one with the same object (colour at the event's start, shape), class and,
    for change_color, new colour; the k-th naming of a key matches its k-th occurrence. Order: every pair of
    matched true events counts as in order when the caption tells them in their temporal order.
    """
    said, truth = parse_video_caption(hypothesis).events, video_truth(meta).events
    positions: dict[tuple, list[int]] = {}
    for i, e in enumerate(said):
        positions.setdefault(_event_key(e), []).append(i)
    used: Counter[tuple] = Counter()
    told_at: dict[int, int] = {}  # true event index -> position in the caption
    for t, e in enumerate(truth):
        key = _event_key(e)
        if used[key] < len(positions.get(key, ())):
            told_at[t] = positions[key][used[key]]
            used[key] += 1
    matched = sorted(told_at)
    pairs = [(a, b) for n, a in enumerate(matched) for b in matched[n + 1 :]]
    counts = {
        "items": 1,
        "events_named": len(said),
        "events_present": len(truth),
        "events_matched": len(matched),
        "pairs_matched": len(pairs),
        "pairs_in_order": sum(told_at[a] < told_at[b] for a, b in pairs),
        "main_event_named": int(int(meta["main_event"]) in told_at),
    }
    return {**counts, **_rates(counts), "multi_event": len(truth) > 1}


def _scores(
    hypotheses: Mapping[str, str], metadata: Mapping[str, Mapping[str, Any]], score_item, subsets: Mapping[str, Any]
) -> ContentScores:
    missing = sorted(set(hypotheses) - set(metadata))
    if missing:
        raise ValueError(
            f"{len(missing)} captioned item(s) are not in metadata.json (first: {missing[0]!r}); score captions of "
            "the synthetic benchmark against the metadata.json generated with them"
        )
    if not hypotheses:
        raise ValueError("no captions to score")
    per_item = {key: score_item(text, metadata[key]) for key, text in hypotheses.items()}
    return ContentScores(
        per_item=per_item,
        mean=summarize(per_item.values()),
        subsets={name: summarize(v for v in per_item.values() if keep(v)) for name, keep in subsets.items()},
    )


def image_content_scores(hypotheses: Mapping[str, str], metadata: Mapping[str, Mapping[str, Any]]) -> ContentScores:
    """Image captions ``{id: caption}`` against ``{id: ImageMeta}`` (``metadata.json``'s "images", by id).

    ``mean`` keys: object_precision / object_recall / object_f1 (colour + shape), size_accuracy (size words
    right, among matched objects given one), relation_precision / relation_recall / relation_f1 (relations
    as unordered pairs with their relation), region_accuracy (lone objects). Subsets: compositional,
    non_compositional (test images that do / do not show a held-out colour-shape combination).
    """
    return _scores(hypotheses, metadata, image_item_scores, {
        "compositional": lambda v: v["compositional"],
        "non_compositional": lambda v: not v["compositional"],
    })


def video_content_scores(hypotheses: Mapping[str, str], metadata: Mapping[str, Mapping[str, Any]]) -> ContentScores:
    """Video captions ``{id: caption}`` against ``{id: VideoMeta}`` (``metadata.json``'s "videos", by id).

    ``mean`` keys: event_precision / event_recall / event_f1, order_accuracy (pairs of matched events told in
    temporal order, over clips with two or more), main_event_recall (clips whose labelled event is named).
    Subsets: multi_event, single_event.
    """
    return _scores(hypotheses, metadata, video_item_scores, {
        "multi_event": lambda v: v["multi_event"],
        "single_event": lambda v: not v["multi_event"],
    })


# --------------------------------------------------------------------------------------------------------
# The ceiling of each template

_OPENINGS = {"image": IMAGE_OPENINGS, "video": VIDEO_OPENINGS}


def template_of(caption: str, *, kind: Literal["image", "video"] = "image") -> str | None:
    """The template (its opening: ``IMAGE_OPENINGS`` or ``VIDEO_OPENINGS``) a caption of ``kind`` uses, or None."""
    words = " ".join(_words(caption))
    return next((o for o in _OPENINGS[kind] if words == o or words.startswith(o + " ")), None)


def _image_references(meta: Mapping[str, Any], rng: np.random.Generator) -> list[str]:
    objects = [ObjectSpec(o["shape"], o["color"], o["size"]) for o in meta["objects"]]
    relations: dict[tuple[int, int], str] = {}
    for r in meta["relations"]:
        relations[(r["subject"], r["object"])] = r["relation"]
        relations[(r["object"], r["subject"])] = INVERSE_RELATION[r["relation"]]
    return image_captions(objects, relations, [o["region"] for o in meta["objects"]], rng)


def _video_references(meta: Mapping[str, Any]) -> list[str]:
    shapes = [o["shape"] for o in meta["objects"]]
    if any("size_before" not in e for e in meta["events"]):
        raise ValueError(f"video {meta.get('id')!r}: its events have no size_before; regenerate the data with this "
                         "version of seqvision.synth")
    return video_captions([
        Mention(obj=e["object"], shape=shapes[e["object"]], color=e["color_before"], size=e["size_before"],
                cls=e["class"], new_color=e["color_after"])
        for e in meta["events"]
    ])


def template_ceilings(
    metadata: Mapping[str, Mapping[str, Any]],
    references: Mapping[str, Sequence[str]],
    *,
    kind: Literal["image", "video"] = "image",
    protocol: Literal["fresh", "leave_one_out"] = "fresh",
    seed: int = 1,
) -> dict[str, float]:
    """CIDEr-D of captions with perfect content in each template of ``kind``: ``{opening: cider_d}``.

    ``fresh``: per item, new references are drawn from its metadata (images: another caption stream, ``seed``;
    videos draw nothing, so theirs equal the real ones), and template k's one is scored against the item's real
    references, as a model's caption would be. ``leave_one_out``: template k's real reference against the other
    references (the protocol of issue #11, which found 1.69-3.53 on the previous image templates and 1.65-2.55
    on the previous video ones). A small spread means no template earns a bonus.
    """
    from seqvision.metrics import cider_d  # pycocoevalcap is only needed here

    ids = sorted(references)
    out: dict[str, float] = {}
    for k, opening in enumerate(_OPENINGS[kind]):
        hyps, refs = {}, {}
        for key in ids:
            if protocol == "fresh":
                meta = metadata[key]
                if kind == "image":
                    fresh = _image_references(meta, np.random.default_rng([seed, zlib.crc32(key.encode())]))
                else:
                    fresh = _video_references(meta)
                hyps[key] = fresh[k]
                refs[key] = list(references[key])
            else:
                own = [r for r in references[key] if template_of(r, kind=kind) == opening]
                if not own:
                    raise ValueError(f"{kind} {key!r} has no reference in the template {opening!r}")
                hyps[key] = own[0]
                refs[key] = [r for r in references[key] if r is not own[0]]
        out[opening] = cider_d(hyps, refs)
    return out
