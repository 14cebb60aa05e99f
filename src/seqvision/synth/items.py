"""One dataset item (a clip or a still image) from its coordinates: spec, pixels, captions, metadata.

Every item owns its random streams, derived from ``(seed, kind, split, index, stream)`` with
``np.random.default_rng``; nothing depends on which process builds it or in what order, which is what
makes the output byte-identical for any worker count. The three streams keep the scene, the captions and
the pixel noise independent, so a resumed run can rebuild an item's captions without rendering it. (Video
captions draw nothing from theirs: they are a function of the clip's spec.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ..config import SynthConfig
from . import render
from .captions import Mention, image_captions, video_captions
from .events import EVENT_CLASSES, ClipSpec, GenerationError, clip_states, final_states, sample_clip
from .scene import (
    COLORS,
    INVERSE_RELATION,
    SHAPES,
    Background,
    ObjectSpec,
    ObjectState,
    place_objects,
    region,
    relation,
    sample_background,
    sample_objects,
)

KINDS = ("video", "image")
SPLITS = ("train", "val", "test")
SPEC, CAPTIONS, PIXELS = 0, 1, 2  # stream numbers


def item_rng(seed: int, kind: str, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, KINDS.index(kind), SPLITS.index(split), index, stream])


class ItemKey(NamedTuple):
    """Where an item sits: ``number`` is global across splits (train first), ``index`` is within its split."""

    kind: str
    split: str
    index: int
    number: int

    @property
    def id(self) -> str:
        return f"{self.kind}{self.number}"

    @property
    def file_name(self) -> str:
        return f"{self.id}.mp4" if self.kind == "video" else f"{self.id}.png"


class ItemRecord(NamedTuple):
    """What the annotation writers need about one item."""

    key: ItemKey
    captions: tuple[str, ...]
    label: int | None  # videos: 0-based EVENT_CLASSES index of the main event
    num_frames: int | None  # videos only
    metadata: dict[str, Any]  # the item's entry in annotations/metadata.json


def item_keys(config: SynthConfig, kind: str) -> list[ItemKey]:
    """Every item of one kind, train then val then test, numbered from 0."""
    sizes = config.videos if kind == "video" else config.images
    keys, number = [], 0
    for split in SPLITS:
        for index in range(getattr(sizes, split)):
            keys.append(ItemKey(kind, split, index, number))
            number += 1
    return keys


def _state_dict(s: ObjectState) -> dict[str, Any]:
    return {
        "x": round(s.x, 2),
        "y": round(s.y, 2),
        "radius": round(s.radius, 2),
        "angle": round(s.angle, 1),
        "alpha": round(s.alpha, 2),
    }


# ---------------------------------------------------------------------------------------------------------
# Videos


def video_spec(config: SynthConfig, key: ItemKey) -> ClipSpec:
    return sample_clip(item_rng(config.seed, "video", key.split, key.index, SPEC), config)


def event_sizes(spec: ClipSpec) -> list[tuple[str, str]]:
    """(size before, size after) of each event's object, in temporal order: only grow and shrink change it."""
    def size_after(count: int, obj: int) -> str:  # the object's size after the first ``count`` events
        return final_states(spec._replace(events=spec.events[:count]))[1][obj].size

    return [(size_after(i, e.obj), size_after(i + 1, e.obj)) for i, e in enumerate(spec.events)]


def video_mentions(spec: ClipSpec) -> list[Mention]:
    """Every event of ``spec`` in temporal order, named by its object's colour and size at the event's start
    (a long-range clip's events are: appear, the labelled event, disappear)."""
    return [
        Mention(obj=e.obj, shape=spec.objects[e.obj].shape, color=e.color_before, size=before, cls=e.cls,
                new_color=e.color_after)
        for e, (before, _) in zip(spec.events, event_sizes(spec))
    ]


def video_record(config: SynthConfig, key: ItemKey, spec: ClipSpec) -> ItemRecord:
    captions = video_captions(video_mentions(spec))
    main = spec.events[spec.main]
    metadata = {
        "id": key.id,
        "split": key.split,
        "file_name": key.file_name,
        "num_frames": spec.num_frames,
        "fps": config.fps,
        "height": config.height,
        "width": config.width,
        "label": spec.label,
        "label_name": main.cls,
        "main_event": spec.main,
        "main_frames": [main.start, main.end - 1],
        "long_range": _long_range_metadata(spec),
        "background": [round(c, 1) for c in spec.background.rgb],
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "initial": _state_dict(s)}
            for o, s in zip(spec.objects, spec.initial)
        ],
        "events": [
            {
                "object": e.obj,
                "class": e.cls,
                "label": EVENT_CLASSES.index(e.cls),
                "start": e.start,
                "end": e.end,
                "color_before": e.color_before,
                "color_after": e.color_after,
                "size_before": size_before,
                "size_after": size_after,
                "before": _state_dict(e.before),
                "after": _state_dict(e.after),
                **({"hop": round(e.hop, 2)} if e.hop else {}),
            }
            for e, (size_before, size_after) in zip(spec.events, event_sizes(spec))
        ],
        "distractor": _walk_metadata(spec),
    }
    return ItemRecord(key, tuple(captions), spec.label, spec.num_frames, metadata)


def _long_range_metadata(spec: ClipSpec) -> dict[str, Any] | None:
    """Where the label information lies in a long-range clip: the frames in which the labelled object is
    visible at all (its fade-in, event and fade-out), and the hidden distance to either end of the clip."""
    if spec.long_range_distance is None:
        return None
    distance = spec.long_range_distance
    return {"distance": distance, "visible_frames": [distance, spec.num_frames - 1 - distance]}


def _walk_metadata(spec: ClipSpec) -> dict[str, Any] | None:
    """Long-range distractor walks: per frame, the (dx, dy) pixel offset of each walking object (in the order
    of ``objects``), added to the state replayed from ``initial`` and the events."""
    if spec.walk is None:
        return None
    movers = spec.walking_objects
    return {
        "kind": "walk",
        "start": 0,
        "end": spec.num_frames,
        "objects": list(movers),
        "offsets": [[[round(float(v), 2) for v in spec.walk[t, j]] for j in movers] for t in range(spec.num_frames)],
    }


def video_frames(config: SynthConfig, key: ItemKey, spec: ClipSpec) -> np.ndarray:
    """The clip's pixels: uint8 (T, H, W, 3) RGB."""
    return render.render_frames(
        spec.objects,
        clip_states(spec),
        spec.background,
        item_rng(config.seed, "video", key.split, key.index, PIXELS),
        height=config.height,
        width=config.width,
        noise_std=config.noise_std,
    )


# ---------------------------------------------------------------------------------------------------------
# Images

Combination = tuple[str, str]  # (colour, shape)
SCENE_ATTEMPTS = 100_000  # draws of a val/test scene before giving up (a handful are needed at the defaults)


def held_out_combinations(seed: int, count: int) -> tuple[Combination, ...]:
    """The ``count`` colour-shape combinations that no train or val image shows, sorted.

    Distinct colours, and the shapes taken in turn, so every colour and every shape is still seen in training
    (each colour with 3 of the 4 shapes at least): the test asks for new *combinations* of known attributes.
    """
    rng = np.random.default_rng([seed, len(KINDS)])  # a stream of its own, apart from every item's
    colors = [list(COLORS)[int(i)] for i in rng.permutation(len(COLORS))[:count]]
    shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))]
    return tuple(sorted((c, shapes[k % len(shapes)]) for k, c in enumerate(colors)))


class ImageScene(NamedTuple):
    """A still scene before rendering."""

    objects: list[ObjectSpec]
    states: list[ObjectState]
    background: Background
    relations: dict[tuple[int, int], str]  # (i, j) -> where object i is relative to object j, every ordered pair
    regions: list[str]  # 3x3 grid cell of each object
    compositional: bool  # shows a held-out combination (test split only)


def scene_signature(objects: list[ObjectSpec], relations: dict[tuple[int, int], str], regions: list[str]) -> tuple:
    """What the captions say about a scene, as a hashable value: the objects (size, colour, shape) with, for one
    object, its region, and for more, every relation. Two scenes with equal signatures get the same captions
    up to synonyms; colours are unique within a scene, so a colour names an object."""
    things = tuple(sorted((o.color, o.shape, o.size) for o in objects))
    if len(objects) == 1:
        return things, regions[0]
    pairs = []
    for (i, j), rel in relations.items():
        a, b = objects[i].color, objects[j].color
        pairs.append((a, rel, b) if a < b else (b, INVERSE_RELATION[rel], a))
    return things, tuple(sorted(set(pairs)))


def _draw_scene(
    config: SynthConfig,
    rng: np.random.Generator,
    *,
    objects_ok: Callable[[list[ObjectSpec]], bool],
    signature_ok: Callable[[tuple], bool],
) -> ImageScene | None:
    """One draw of a still scene, or None when the placement fails or a check refuses it."""
    height, width = config.height, config.width
    objects = sample_objects(rng, int(rng.integers(1, config.max_objects + 1)))
    if not objects_ok(objects):
        return None
    states = place_objects(rng, objects, height=height, width=width, random_angle=True, separated=True)
    if states is None:
        return None
    n = len(objects)
    relations = {(i, j): relation(states[i], states[j]) for i in range(n) for j in range(n) if i != j}
    regions = [region(s, height=height, width=width) for s in states]
    if not signature_ok(scene_signature(objects, relations, regions)):
        return None
    return ImageScene(objects, states, sample_background(rng), relations, regions, compositional=False)


@functools.lru_cache(maxsize=4)
def train_signatures(config: SynthConfig) -> frozenset:
    """``scene_signature`` of every train image (what val and test images must differ from)."""
    return frozenset(
        scene_signature(scene.objects, scene.relations, scene.regions)
        for key in item_keys(config, "image")
        if key.split == "train"
        for scene in [image_scene(config, key)]
    )


def image_scene(config: SynthConfig, key: ItemKey) -> ImageScene:
    """The scene of one image, redrawn from the item's stream until it fits its split: train and val images
    show no held-out combination; a test image shows at least one with probability 1/2 (then it is
    *compositional*) and none otherwise; no val or test scene equals a train scene (``scene_signature``)."""
    rng = item_rng(config.seed, "image", key.split, key.index, SPEC)
    held_out = set(held_out_combinations(config.seed, config.held_out_combinations))
    compositional = bool(rng.random() < 0.5) and key.split == "test" and bool(held_out)
    seen = train_signatures(config) if key.split != "train" else frozenset()

    def objects_ok(objects: list[ObjectSpec]) -> bool:
        return any((o.color, o.shape) in held_out for o in objects) == compositional

    for _ in range(SCENE_ATTEMPTS):
        scene = _draw_scene(config, rng, objects_ok=objects_ok, signature_ok=lambda sig: sig not in seen)
        if scene is not None:
            return scene._replace(compositional=compositional)
    raise GenerationError(
        f"{key.id}: no {key.split} scene unlike every train scene in {SCENE_ATTEMPTS} draws; with "
        f"synth.max_objects {config.max_objects} there are few distinct scenes: lower synth.images.train or "
        "raise synth.max_objects"
    )


def image_item(config: SynthConfig, key: ItemKey) -> tuple[ItemRecord, np.ndarray]:
    """A still scene: its record and pixels, uint8 (H, W, 3) RGB. Objects never touch and every pair has
    a clear dominant axis, so each relation in the captions is visible."""
    height, width = config.height, config.width
    scene = image_scene(config, key)
    objects, states = scene.objects, scene.states
    n = len(objects)
    captions = image_captions(
        objects, scene.relations, scene.regions, item_rng(config.seed, "image", key.split, key.index, CAPTIONS)
    )
    base = render.background_image(scene.background, height=height, width=width)
    pixels = render.finish(
        render.compose(base, objects, states),
        item_rng(config.seed, "image", key.split, key.index, PIXELS),
        noise_std=config.noise_std,
    )
    boxes = [render.bounding_box(render.coverage(o.shape, s, height=height, width=width)) for o, s in zip(objects, states)]
    metadata = {
        "id": key.id,
        "split": key.split,
        "file_name": key.file_name,
        "height": height,
        "width": width,
        "background": [round(c, 1) for c in scene.background.rgb],
        "compositional": scene.compositional,
        "objects": [
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                **_state_dict(s),
                "region": r,
                "bbox": box,
            }
            for o, s, r, box in zip(objects, states, scene.regions, boxes)
        ],
        "relations": [
            {"subject": i, "relation": scene.relations[(i, j)], "object": j} for i in range(n) for j in range(i + 1, n)
        ],
    }
    return ItemRecord(key, tuple(captions), None, None, metadata), pixels
