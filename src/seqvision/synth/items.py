"""One dataset item (a clip or a still image) from its coordinates: spec, pixels, captions, metadata.

Every item owns its random streams, derived from ``(seed, kind, split, index, stream)`` with
``np.random.default_rng``; nothing depends on which process builds it or in what order, which is what
makes the output byte-identical for any worker count. The three streams keep the scene, the captions and
the pixel noise independent, so a resumed run can rebuild an item's captions without rendering it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..config import SynthConfig
from . import render
from .captions import Mention, image_captions, video_captions
from .events import EVENT_CLASSES, ClipSpec, clip_states, sample_clip
from .scene import ObjectState, place_objects, region, relation, sample_background, sample_objects

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


def video_record(config: SynthConfig, key: ItemKey, spec: ClipSpec) -> ItemRecord:
    # Every event, in order. A long-range clip has exactly one (its jitter tail is not an event), so its
    # captions describe the main event only.
    mentions = [
        Mention(
            obj=e.obj,
            shape=spec.objects[e.obj].shape,
            color=e.color_before,
            size=spec.objects[e.obj].size,
            cls=e.cls,
            new_color=e.color_after,
        )
        for e in spec.events
    ]
    captions = video_captions(mentions, item_rng(config.seed, "video", key.split, key.index, CAPTIONS))
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
        "long_range": config.long_range,
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
                "before": _state_dict(e.before),
                "after": _state_dict(e.after),
                **({"hop": round(e.hop, 2)} if e.hop else {}),
            }
            for e in spec.events
        ],
        "distractor": None
        if spec.distractor_start is None
        else {
            "start": spec.distractor_start,
            "end": spec.num_frames,
            "kind": "jitter",
            "objects": list(spec.jittered_objects),
        },
    }
    return ItemRecord(key, tuple(captions), spec.label, spec.num_frames, metadata)


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


def image_item(config: SynthConfig, key: ItemKey) -> tuple[ItemRecord, np.ndarray]:
    """A still scene: its record and pixels, uint8 (H, W, 3) RGB. Objects never touch and every pair has
    a clear dominant axis, so each relation in the captions is visible."""
    height, width = config.height, config.width
    rng = item_rng(config.seed, "image", key.split, key.index, SPEC)
    while True:
        objects = sample_objects(rng, int(rng.integers(1, config.max_objects + 1)))
        states = place_objects(rng, objects, height=height, width=width, random_angle=True, separated=True)
        if states is not None:
            break
    background = sample_background(rng)
    n = len(objects)
    relations = {(i, j): relation(states[i], states[j]) for i in range(n) for j in range(n) if i != j}
    regions = [region(s, height=height, width=width) for s in states]
    captions = image_captions(objects, relations, regions, item_rng(config.seed, "image", key.split, key.index, CAPTIONS))

    base = render.background_image(background, height=height, width=width)
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
        "background": [round(c, 1) for c in background.rgb],
        "objects": [
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                **_state_dict(s),
                "region": r,
                "bbox": box,
            }
            for o, s, r, box in zip(objects, states, regions, boxes)
        ],
        "relations": [
            {"subject": i, "relation": relations[(i, j)], "object": j} for i in range(n) for j in range(i + 1, n)
        ],
    }
    return ItemRecord(key, tuple(captions), None, None, metadata), pixels
