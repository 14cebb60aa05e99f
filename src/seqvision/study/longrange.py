"""Row 1 of the seed's table: long-range dependencies, as test accuracy vs the distance D over which a model must
carry the label.

The slide: RNNs are "good in theory, hard in practice" at long-range dependencies (the gradient through D steps of
a recurrence vanishes or explodes), Transformers "good in practice" (self-attention reaches every frame in one
step). The prediction it makes: a recurrent model's accuracy falls as D grows, the Transformer's holds.

The data is the synthetic benchmark's long-range mode (docs/data.md, "Long-range mode"): the labelled object is
hidden for the first D frames, fades in, does the labelled event (one of six: three exact reversal pairs), fades
out and stays hidden for the last D frames, while one or two distractors walk for the whole clip. A model that
reads the clip front to back must carry what it saw over D frames.

- :func:`prepare`   renders every clip once at the largest distance, encodes its frames with the pipeline's frame
                    encoder (``artifacts/encoder/encoder.pt``) and writes, per distance, the centre crop of each
                    clip (a clip at distance D' < D is the middle ``2 D' + 2F + E - 2`` frames of one at D: the
                    distractors' walk is stationary, so the crop is a clip of the smaller distance) as a features
                    folder the training code reads, plus the three controls' folders.
- :func:`run_long_range` trains every family at every distance (seeds), the controls, and evaluates the models of
                    ``long_length_distance`` on clips 2x and 4x as long; then :func:`analyse`.

Controls (at the shortest and the longest distance), which must not beat chance: a model that sees only the last D
frames (the labelled object is never visible there: chance is 1/6), and two that are blind to frame order, the
mean-pool family on whole clips (a bag of frames) and a model on frames shuffled within each clip. A clip and its
reversal show the same frames, so an order-blind model can at best name the pair and guess its direction: 1/2.

What travels D frames. Every activity model reads its frames minus the clip's mean frame (``blocks.center_clip``,
the comparison's input), and that mean includes the labelled episode: at every frame a model can know *which* pair
the clip belongs to. What must be carried over D frames is the direction (left or right, up or down, grow or
shrink): the part of the label above 1/2.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import unittest.mock
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqvision import checkpoint, io, mingru, rnn, transformer
from seqvision.blocks import length_mask, masked_mean
from seqvision.config import Params, SplitSizes, to_dict
from seqvision.encoders import extract_features
from seqvision.features import load_encoder
from seqvision.metrics import seed_summary
from seqvision.models import build_from_checkpoint
from seqvision.runtime import usable_cores
from seqvision.study.bias import SizePoint, TrainingSpec, compare, run_trainings, scaled_schedule
from seqvision.study.complexity import Finding, Log, RowResult
from seqvision.study.fit import Verdict, combine
from seqvision.study.measure import Cell, CellError, run_isolated
from seqvision.study.presets import StudyConfig
from seqvision.synth.events import EVENT_CLASSES, FADE_FRAMES, LONG_RANGE_CLASSES, REVERSE
from seqvision.synth.items import item_keys, video_frames, video_record, video_spec

ROW = "long_range"
TASK = "activity"
SPLITS = ("train", "val", "test")
COLUMNS: dict[str, tuple[str, ...]] = {"RNNs": ("rnn", "lstm", "gru"), "Transformers": ("transformer",),
                                       "minGRU": ("mingru",)}
CLAIMS = {"RNNs": "hard in practice: accuracy falls as the distance grows",
          "Transformers": "good in practice: accuracy holds at every distance",
          "minGRU": "hard in practice (a recurrence): accuracy falls as the distance grows"}
# The controls: what each sees, and its chance level (fraction of the classes it cannot tell apart).
CONTROLS = ("last_frames", "shuffled", "bag_of_frames")
NUM_CLASSES = len(LONG_RANGE_CLASSES)
NUM_PAIRS = len({frozenset((c, REVERSE[c])) for c in LONG_RANGE_CLASSES})
# A model blind to frame order still tells the three pairs apart (which of position or size changes) and then guesses
# within the pair: its ceiling is 1/2. Above it, a model uses order.
ORDER_BLIND = NUM_PAIRS / NUM_CLASSES
CHANCE = {"last_frames": 1.0 / NUM_CLASSES, "shuffled": ORDER_BLIND, "bag_of_frames": ORDER_BLIND}
# Accuracy "holds" when the fall from the shortest to the longest distance is at most this, with 95% confidence. With
# three seeds the interval of a paired difference spans about +-0.06 even when nothing changes (the seeds' t-quantile
# at 2-4 degrees of freedom), so a margin of 0.05 could never be shown; 0.1 is a tenth of the accuracy scale.
HOLD_MARGIN = 0.1
CONTROL_MARGIN = 0.1  # a control "sits at chance" when its best mean is at most chance + this
LENGTH_FACTORS = (2, 4)  # train at length N, test at 2N and 4N


# --------------------------------------------------------------------------------------------------------
# Data


def clip_length(distance: int, main_event_frames: int) -> int:
    """Frames of a long-range clip at ``distance`` (``synth.events.long_range_frames``)."""
    return 2 * distance + 2 * FADE_FRAMES + main_event_frames - 2


def distance_for_length(length: int, main_event_frames: int) -> int:
    """The largest distance whose clips have at most ``length`` frames."""
    return (length - 2 * FADE_FRAMES - main_event_frames + 2) // 2


def length_test_distances(config: StudyConfig, main_event_frames: int) -> dict[int, int]:
    """``{factor: distance}``: the clips 2x and 4x as long as those of ``long_length_distance``."""
    n = clip_length(config.long_length_distance, main_event_frames)
    return {k: distance_for_length(k * n, main_event_frames) for k in LENGTH_FACTORS}


def synth_config(config: StudyConfig, params: Params, distance: int) -> Any:
    """The pipeline's synthetic benchmark settings in long-range mode at ``distance``, with the row's clip counts
    and seed (frame size, noise, objects and event length as in ``params.synth``)."""
    return dataclasses.replace(
        params.synth, long_range=True, long_range_distance=distance, seed=config.seed,
        videos=SplitSizes(train=config.long_train_clips, val=config.long_val_clips, test=config.long_test_clips),
    )


def _encode_clips(synth: Any, numbers: Sequence[int], encoder_path: str, out_path: str) -> list[dict[str, Any]]:
    """Render and encode the clips ``numbers`` of ``synth`` (in a fresh single-threaded process) into
    ``out_path`` (float16 (n, T, F)); per clip its id, split, label and visible frames."""
    torch.set_num_threads(1)
    encoder = load_encoder(encoder_path)
    keys = {k.number: k for k in item_keys(synth, "video")}
    features, records = [], []
    for number in numbers:
        key = keys[number]
        spec = video_spec(synth, key)
        record = video_record(synth, key, spec)
        features.append(extract_features(encoder, video_frames(synth, key, spec)[None], batch_size=512)[0])
        name = EVENT_CLASSES[record.label]
        records.append({"id": key.file_name.rsplit(".", 1)[0], "file_name": key.file_name, "split": key.split,
                        "label": LONG_RANGE_CLASSES.index(name),
                        "visible_frames": record.metadata["long_range"]["visible_frames"]})
    np.save(out_path, np.stack(features))
    return records


@dataclass(frozen=True)
class Clips:
    """Every clip of the row, rendered and encoded once at the largest distance."""

    distance: int
    main_event_frames: int
    features: Mapping[str, np.ndarray]  # split -> float16 (n, T, F)
    records: Mapping[str, Sequence[Mapping[str, Any]]]  # split -> [{"id", "file_name", "label", ...}]

    def crop(self, distance: int) -> dict[str, np.ndarray]:
        """Every clip's middle frames: the clips at ``distance``."""
        if not 0 <= distance <= self.distance:
            raise ValueError(f"distance {distance} outside 0..{self.distance}")
        cut = self.distance - distance
        return {s: f[:, cut:f.shape[1] - cut] for s, f in self.features.items()}

    def last_frames(self, distance: int) -> dict[str, np.ndarray]:
        """The last ``distance`` frames of every clip at ``distance``: the labelled object is hidden in all."""
        cropped = self.crop(distance)
        return {s: f[:, f.shape[1] - distance:] for s, f in cropped.items()}

    def shuffled(self, distance: int, *, seed: int) -> dict[str, np.ndarray]:
        """The clips at ``distance``, each with its frames in a random order (one fixed permutation per clip)."""
        out = {}
        for split, f in self.crop(distance).items():
            rng = np.random.default_rng([seed, SPLITS.index(split)])
            out[split] = np.stack([clip[rng.permutation(len(clip))] for clip in f])
        return out


def render_clips(config: StudyConfig, params: Params, *, encoder_path: str | Path, work_dir: Path, distance: int,
                 workers: int, log: Log = None) -> Clips:
    """Render and encode every clip at ``distance``, ``workers`` fresh processes at a time."""
    synth = synth_config(config, params, distance)
    numbers = [k.number for k in item_keys(synth, "video")]
    count = min(workers * 4, len(numbers))  # a few chunks per worker, none empty
    chunks = [numbers[i::count] for i in range(count)]
    parts = work_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    frames = len(numbers) * clip_length(distance, synth.main_event_frames)
    if log:
        log(f"{ROW}: rendering and encoding {len(numbers)} clips of {clip_length(distance, synth.main_event_frames)} "
            f"frames ({frames} frames) with {encoder_path}, {workers} processes")

    def one(i: int) -> list[dict[str, Any]]:
        return run_isolated(_encode_clips, synth, chunks[i], str(encoder_path), str(parts / f"part{i}.npy"),
                            timeout_s=config.long_timeout_s)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, range(len(chunks))))
    by_number: dict[int, tuple[dict[str, Any], np.ndarray]] = {}
    for i, records in enumerate(results):
        array = np.load(parts / f"part{i}.npy")
        for j, (number, record) in enumerate(zip(chunks[i], records)):
            by_number[number] = (record, array[j])
        (parts / f"part{i}.npy").unlink()
    parts.rmdir()
    features, records_by_split = {}, {}
    for split in SPLITS:
        mine = [by_number[n] for n in sorted(by_number) if by_number[n][0]["split"] == split]
        records_by_split[split] = [r for r, _ in mine]
        features[split] = np.stack([a for _, a in mine])
    return Clips(distance, synth.main_event_frames, features, records_by_split)


def write_labels(clips: Clips, out: Path) -> None:
    """UCF101-style label lists of the row's clips (``classInd.txt``, ``{train,val,test}list01.txt``)."""
    io.write_text(out / "classInd.txt", "".join(f"{i + 1} {name}\n" for i, name in enumerate(LONG_RANGE_CLASSES)))
    for split in SPLITS:
        io.write_text(out / f"{split}list01.txt",
                      "".join(f"{r['file_name']} {r['label'] + 1}\n" for r in clips.records[split]))


def write_features(arrays: Mapping[str, np.ndarray], records: Mapping[str, Sequence[Mapping[str, Any]]],
                   out: Path, *, description: str) -> None:
    """A features folder as the features stage writes it (``index.json`` + ``videos-{split}.npy``)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = [{"id": r["id"], "split": split, "shard": 0, "row": i}
               for split in SPLITS for i, r in enumerate(records[split])]
    for split in SPLITS:
        np.save(out / f"videos-{split}.npy", np.ascontiguousarray(arrays[split]))
    io.write_json(out / "index.json", {
        "videos": entries, "images": [],
        "features": {"description": description, "dtype": "float16",
                     "arrays": {f"videos-{s}.npy": list(arrays[s].shape) for s in SPLITS}},
    })


@dataclass(frozen=True)
class Prepared:
    """Where the row's data went: ``folders[(kind, distance)]`` with kind "clips" or one of CONTROLS' data
    ("last_frames", "shuffled"; the bag-of-frames control reads the "clips" folder)."""

    labels: Path
    folders: Mapping[tuple[str, int], Path]
    length_distances: Mapping[int, int]
    num_frames: Mapping[int, int]
    num_clips: Mapping[str, int]
    test_ids: Sequence[str]  # in the features folders' row order


def prepare(config: StudyConfig, params: Params, *, encoder_path: str | Path, work_dir: str | Path,
            log: Log = None) -> Prepared:
    """Render, encode and write every folder the row trains and tests on, under ``work_dir/data``."""
    work = Path(work_dir) / "data"
    main_event_frames = params.synth.main_event_frames
    lengths = length_test_distances(config, main_event_frames)
    top = max([*config.long_distances, *lengths.values()])
    clips = render_clips(config, params, encoder_path=encoder_path, work_dir=work, distance=top,
                         workers=config.long_workers or usable_cores(), log=log)
    write_labels(clips, work / "labels")
    folders: dict[tuple[str, int], Path] = {}
    for distance in sorted({*config.long_distances, *lengths.values()}):
        folders[("clips", distance)] = work / f"D{distance}"
        write_features(clips.crop(distance), clips.records, folders[("clips", distance)],
                       description=f"long-range clips at distance {distance}")
    for distance in sorted({min(config.long_distances), max(config.long_distances)}):
        folders[("last_frames", distance)] = work / f"D{distance}-last"
        write_features(clips.last_frames(distance), clips.records, folders[("last_frames", distance)],
                       description=f"the last {distance} frames of the clips at distance {distance}")
        folders[("shuffled", distance)] = work / f"D{distance}-shuffled"
        write_features(clips.shuffled(distance, seed=config.seed), clips.records, folders[("shuffled", distance)],
                       description=f"the clips at distance {distance}, frames shuffled within each clip")
    return Prepared(work / "labels", folders, lengths,
                    {d: clip_length(d, main_event_frames) for d in sorted({*config.long_distances, *lengths.values()})},
                    {s: len(clips.records[s]) for s in SPLITS}, [r["id"] for r in clips.records["test"]])


# --------------------------------------------------------------------------------------------------------
# Trainings


@dataclass(frozen=True)
class Run:
    """What one group of trainings is: a family (or a control) at a distance."""

    variant: str  # a family, or "control:<name>"
    family: str
    distance: int
    data: str  # "clips", "last_frames" or "shuffled"


def plan_runs(config: StudyConfig) -> list[Run]:
    """Every family at every distance; the controls at the shortest distance (the most evidence per frame, where a
    leak would show most) and the longest (where a model must look furthest)."""
    runs = [Run(family, family, d, "clips") for family in config.long_families for d in config.long_distances]
    for d in sorted({min(config.long_distances), max(config.long_distances)}):
        runs.append(Run("control:last_frames", config.long_control_family, d, "last_frames"))
        runs.append(Run("control:shuffled", config.long_control_family, d, "shuffled"))
        runs.append(Run("control:bag_of_frames", "meanpool", d, "clips"))
    return runs


def training_specs(config: StudyConfig, params: Params, prepared: Prepared, work_dir: Path
                   ) -> list[tuple[Run, TrainingSpec]]:
    """One :class:`TrainingSpec` per (run, seed), in :func:`plan_runs` order; the runs of the families at
    ``long_length_distance`` are also tested on the longer clips. With ``long_budget="steps"`` every training gets
    at least the optimizer steps of the comparison's training on ``synth.videos.train`` clips (epochs and patience
    scaled, :func:`~seqvision.study.bias.scaled_schedule`)."""
    train = params.train
    if config.long_epochs:
        train = dataclasses.replace(train, epochs=config.long_epochs)
    train = scaled_schedule(train, items=config.long_train_clips, full_items=params.synth.videos.train,
                            equal_steps=config.long_budget == "steps")
    out = []
    for run in plan_runs(config):
        extra: tuple[tuple[str, str], ...] = ()
        if run.data == "clips" and run.variant == run.family and run.distance == config.long_length_distance:
            extra = tuple((f"{k}x", str(prepared.folders[("clips", d)])) for k, d in prepared.length_distances.items())
        for k in range(config.long_seeds):
            name = f"{ROW}/{run.variant} D={run.distance} seed {k}"
            out.append((run, TrainingSpec(
                family=run.family, fraction=1.0, seed_index=k, train_ids=None,
                train_config=dataclasses.replace(train, seed=train.seed + k),
                model_config=params.models.family(run.family), budget=params.models.match_params.budget(TASK),
                features_dir=str(prepared.folders[(run.data, run.distance)]), activity_dir=str(prepared.labels),
                activity_split=1, out_dir=str(work_dir / "runs" / run.variant.replace(":", "-") / f"D{run.distance}"
                                              / f"seed{k}"),
                extra_tests=extra, name=name)))
    return out


# --------------------------------------------------------------------------------------------------------
# Gradients: "good in theory, hard in practice" made visible


def gradient_profile(checkpoint_path: str, features_dir: str, *, seed: int, clips: int = 64) -> dict[str, list[float]]:
    """Mean over ``clips`` test clips of ||dL/dc_t||, the gradient of the loss with respect to frame t's centred
    features c_t = x_t - mean(x) (what the model reads, ``blocks.center_clip``), for the trained model (``best.pt``)
    and for the same architecture freshly initialised (``seed``); dropout off.

    A recurrence passes the evidence of frame t to the loss through T - t steps: its gradient decays with that distance
    (or explodes); attention reaches every frame in one step. The gradient with respect to x_t would also hold the path
    through the clip mean, 1/T of every frame's gradient, a flat floor that hides the decay: the mean is held constant
    here. Runs in a fresh process."""
    torch.set_num_threads(1)
    saved = checkpoint.load(checkpoint_path)
    test = np.load(Path(features_dir) / "videos-test.npy", mmap_mode="r")[:clips]
    lines = (Path(features_dir).parent / "labels" / "testlist01.txt").read_text(encoding="utf-8").split()
    labels = torch.tensor([int(label) - 1 for label in lines[1::2]][:clips])
    out = {}
    for name in ("init", "trained"):
        torch.manual_seed(seed)
        model = build_from_checkpoint(saved, load_weights=name == "trained").eval()
        x = torch.tensor(np.asarray(test, dtype=np.float32), requires_grad=True)
        lengths = torch.full((x.size(0),), x.size(1), dtype=torch.long)
        with constant_clip_mean():
            _, loss = model(x, lengths, labels)
        loss.backward()
        out[name] = [float(v) for v in x.grad.norm(dim=-1).mean(0)]
    return out


@contextlib.contextmanager
def constant_clip_mean() -> Iterator[None]:
    """Within: every activity model's ``center_clip`` treats the clip mean as a constant (same values, no gradient)."""
    def centre(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = length_mask(lengths, x.size(1)).unsqueeze(-1).to(x.dtype)
        return (x - masked_mean(x, lengths).unsqueeze(1).detach()) * mask

    with contextlib.ExitStack() as stack:
        for module in (rnn, mingru, transformer):
            stack.enter_context(unittest.mock.patch.object(module, "center_clip", centre))
        yield


# --------------------------------------------------------------------------------------------------------
# Analysis


def _correct(bits: Sequence[str]) -> tuple[np.ndarray, ...]:
    return tuple(np.frombuffer(s.encode(), dtype=np.uint8) - ord("0") for s in bits)


def point(cell: Cell) -> SizePoint:
    """A cell as the comparisons of row 4 take it (``fraction`` holds the distance)."""
    return SizePoint(cell.variant, float(cell.key["distance"]), int(cell.settings["train_items"] or 0),
                     tuple(cell.metrics["top_1"]), _correct(cell.settings["test_correct"]))


def learned(cell: Cell, chance: float) -> bool:
    """The seeds' 95% interval lies above ``chance``."""
    summary = seed_summary(cell.metrics.get("top_1", ()))
    return summary["ci95"] is not None and summary["ci95"][0] > chance


def family_verdict(column: str, shortest: Cell, interval: Sequence[float], *, measured: str) -> Verdict:
    """A family's verdict from its accuracy at the shortest distance (``shortest``) and the 95% interval of the change
    to the longest (``interval``: :func:`compare` of longest vs shortest, paired on the test clips).

    Inconclusive when the family is not above the order-blind ceiling (1/2, its seeds' 95% interval) at the shortest
    distance: it never learned to use order, so no fall can be measured. Otherwise, with the 95% interval [lo, hi] of
    (accuracy at the longest) - (accuracy at the shortest):

    - it *falls* when hi < 0 and lo < -HOLD_MARGIN (a significant fall that may exceed the margin);
    - it *holds* when lo >= -HOLD_MARGIN (whatever it lost is within the margin, with 95% confidence);
    - else (the interval holds both 0 and -HOLD_MARGIN) the test cannot tell: inconclusive.

    A fall agrees with the recurrent claim and disagrees with the Transformer's; holding the other way round.
    "No significant fall" alone is not "holds": three seeds and 120 test clips miss falls of 0.05-0.08.
    Falls of less than the margin count as holding.
    """
    claim = CLAIMS[column]
    if not learned(shortest, ORDER_BLIND):
        return Verdict("inconclusive", claim, measured,
                       "not above the order-blind ceiling (1/2) even at the shortest distance: it never used order")
    low, high = interval
    recurrent = column != "Transformers"
    if high < 0 and low < -HOLD_MARGIN:
        return Verdict("agrees" if recurrent else "disagrees", claim, measured,
                       "accuracy falls significantly from the shortest to the longest distance")
    if low >= -HOLD_MARGIN:
        return Verdict("disagrees" if recurrent else "agrees", claim, measured,
                       f"accuracy holds within {HOLD_MARGIN:g} from the shortest to the longest distance")
    return Verdict("inconclusive", claim, measured,
                   f"the change in accuracy is neither a significant fall nor within {HOLD_MARGIN:g}: too few seeds "
                   "or test clips to tell")


def analyse(cells: Sequence[Cell], *, seed: int = 0) -> dict[str, Any]:
    """Curves (mean and 95% interval over seeds per distance), per family the shortest-vs-longest comparison and
    its verdict, every family against the Transformer at each distance, the controls against their chance, the
    length generalisation, and each family's reach (the largest distance at which it is above 1/2)."""
    by_variant: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.metrics.get("top_1"):
            by_variant.setdefault(cell.variant, []).append(cell)
    for mine in by_variant.values():
        mine.sort(key=lambda c: c.key["distance"])
    curves = {v: [{"distance": c.key["distance"], "frames": c.key["frames"], **seed_summary(c.metrics["top_1"])}
                  for c in mine] for v, mine in by_variant.items()}
    verdicts: dict[str, Verdict] = {}
    drops: dict[str, dict[str, Any]] = {}
    for column, families in COLUMNS.items():
        for family in families:
            mine = by_variant.get(family, [])
            if len(mine) < 2:
                continue
            drop = compare(point(mine[-1]), point(mine[0]), seed=seed)
            drops[family] = drop
            measured = (f"{family}: top-1 {np.mean(mine[0].metrics['top_1']):.3f} at D={mine[0].key['distance']}, "
                        f"{np.mean(mine[-1].metrics['top_1']):.3f} at D={mine[-1].key['distance']} "
                        f"({drop['difference']:+.3f} [{drop['interval'][0]:+.3f}, {drop['interval'][1]:+.3f}])")
            verdicts[family] = family_verdict(column, mine[0], drop["interval"], measured=measured)
    reference = {c.key["distance"]: c for c in by_variant.get("transformer", [])}
    versus = {v: [{"distance": c.key["distance"], **compare(point(c), point(reference[c.key["distance"]]), seed=seed)}
                  for c in mine if c.key["distance"] in reference]
              for v, mine in by_variant.items() if v != "transformer" and not v.startswith("control:")}
    reach = {v: max((c.key["distance"] for c in mine if learned(c, ORDER_BLIND)), default=None)
             for v, mine in by_variant.items() if not v.startswith("control:")}
    controls = {}
    for name in CONTROLS:
        mine = by_variant.get(f"control:{name}", [])
        means = [float(np.mean(c.metrics["top_1"])) for c in mine]
        controls[name] = {"chance": CHANCE[name], "max_mean": max(means) if means else None,
                          "at_chance": bool(means) and max(means) <= CHANCE[name] + CONTROL_MARGIN}
    lengths = {}
    for v, mine in by_variant.items():
        for c in mine:
            if c.settings.get("length_tests"):
                lengths[v] = {"distance": c.key["distance"], "frames": c.key["frames"],
                              "tests": {name: {**t, **seed_summary(t["top_1"])}
                                        for name, t in c.settings["length_tests"].items()},
                              "train": seed_summary(c.metrics["top_1"])}
    return {"curves": curves, "drops": drops, "verdicts": verdicts, "versus_transformer": versus, "reach": reach,
            "controls": controls, "length_generalisation": lengths}


def table_cells(verdicts: Mapping[str, Verdict]) -> list[dict[str, str]]:
    out = []
    for column, families in COLUMNS.items():
        judged = {f: verdicts[f] for f in families if f in verdicts}
        if judged:
            out.append({"column": column, "quantity": "long-range dependencies", "claim": CLAIMS[column],
                        "measured": "; ".join(v.measured for v in judged.values()),
                        "verdict": combine(judged, depends_on="the cell")})
    return out


def summary_lines(result: RowResult) -> list[str]:
    """Reach, controls and length generalisation, one line each, for logs and the CLI."""
    extra = result.extra
    lines = [f"{ROW}: largest distance above the order-blind 1/2: " + ", ".join(
        f"{v} {'none' if d is None else d}" for v, d in extra["reach"].items())]
    versus = [(v, rows[-1]) for v, rows in extra["versus_transformer"].items() if rows]
    if versus:
        lines.append(f"{ROW}: against the Transformer at the largest distance: " + ", ".join(
            f"{v} {row['difference']:+.3f} [{row['interval'][0]:+.3f}, {row['interval'][1]:+.3f}] {row['symbol']}"
            f" (D={row['distance']})" for v, row in versus))
    for name, found in extra["controls"].items():
        best = "no result" if found["max_mean"] is None else f"best mean {found['max_mean']:.3f}"
        lines.append(f"{ROW}/control {name}: {best} vs chance {found['chance']:.3f} -> "
                     f"{'at chance' if found['at_chance'] else 'ABOVE CHANCE: the benchmark leaks'}")
    for v, found in extra["length_generalisation"].items():
        tests = ", ".join(f"{name} ({t['frames']} frames) {t['mean']:.3f}" for name, t in found["tests"].items())
        lines.append(f"{ROW}/{v}: trained on {found['frames']} frames {found['train']['mean']:.3f}; tested on {tests}")
    return lines


# --------------------------------------------------------------------------------------------------------
# The row


def run_long_range(config: StudyConfig, *, params: Params, work_dir: str | Path, log: Log = None) -> RowResult:
    """Row 1: every family of ``config.long_families`` at every distance, ``long_seeds`` seeds, plus the controls
    and the length generalisation. Data and trainings go under ``work_dir`` (``data/``, ``runs/``)."""
    work = Path(work_dir)
    prepared = prepare(config, params, encoder_path=config.long_encoder, work_dir=work, log=log)
    planned = training_specs(config, params, prepared, work)
    workers = config.long_workers or usable_cores()
    if log:
        log(f"{ROW}: {len(planned)} trainings ({len(config.long_families)} families x {len(config.long_distances)} "
            f"distances and 3 controls x 2 distances, {config.long_seeds} seeds each) on "
            f"{prepared.num_clips['train']} training clips, {workers} at a time")
    results = run_trainings([s for _, s in planned], workers=workers, timeout_s=config.long_timeout_s, log=log)
    test_ids = list(prepared.test_ids)
    cells = []
    runs = list(dict.fromkeys(run for run, _ in planned))
    for run in runs:
        mine = [(s, r) for (rn, s), r in zip(planned, results) if rn == run]
        done = [(s, r) for s, r in mine if isinstance(r, dict)]
        metrics = {m: [float(r[m]) for _, r in done]
                   for m in ("top_1", "mean_class_accuracy", "best_val_accuracy", "epochs_run", "train_time_s")}
        metrics["converged"] = [float(r["converged"]) for _, r in done]
        length_tests = {}
        for name, distance in ((f"{k}x", d) for k, d in prepared.length_distances.items()):
            scores = [r["extra"][name] for _, r in done if name in r["extra"]]
            if scores:
                length_tests[name] = {"distance": distance, "frames": prepared.num_frames[distance],
                                      "top_1": [float(s["top_1"]) for s in scores],
                                      "test_correct": ["".join(str(int(s["correct"][i])) for i in test_ids)
                                                       for s in scores]}
        settings = {
            "family": run.family, "data": run.data, "seeds": [s.train_config.seed for s, _ in done],
            "epochs_cap": done[0][0].train_config.epochs if done else None,
            "num_parameters": done[0][1]["num_parameters"] if done else None,
            "train_items": done[0][1]["train_items"] if done else None,
            "test_correct": ["".join(str(int(r["correct"][i])) for i in test_ids) for _, r in done],
            "length_tests": length_tests, "notes": sorted({n for _, r in done for n in r["notes"]}),
        }
        errors = [f"seed {s.seed_index}: {r}" for s, r in mine if isinstance(r, str)]
        frames = prepared.num_frames[run.distance] if run.data != "last_frames" else run.distance
        cells.append(Cell(ROW, run.variant, {"distance": run.distance, "frames": frames}, metrics, settings, errors))
    analysis = analyse(cells, seed=config.seed)
    analysis["gradients"] = gradients(config, planned, results, prepared, log=log)
    verdicts = analysis.pop("verdicts")
    findings = [Finding(ROW, family, "top_1", None, v) for family, v in verdicts.items()]
    extra = {**analysis, "test_ids": test_ids, "num_clips": dict(prepared.num_clips),
             "num_frames": {str(d): n for d, n in prepared.num_frames.items()},
             "length_distances": {f"{k}x": d for k, d in prepared.length_distances.items()},
             "num_classes": NUM_CLASSES, "classes": list(LONG_RANGE_CLASSES), "chance": CHANCE,
             "encoder": str(config.long_encoder), "train": to_dict(params.train)}
    if log:
        for line in summary_lines(RowResult(ROW, cells, findings, extra=extra)):
            log(line)
    return RowResult(ROW, cells, findings, table_cells(verdicts), extra=extra, config=to_dict(config))


def gradients(config: StudyConfig, planned: Sequence[tuple[Run, TrainingSpec]], results: Sequence[Any],
              prepared: Prepared, *, log: Log = None) -> dict[str, Any]:
    """:func:`gradient_profile` of each family's first seed at the largest distance (the hardest clips)."""
    top = max(config.long_distances)
    out: dict[str, Any] = {}
    for (run, spec), result in zip(planned, results):
        if run.variant != run.family or run.distance != top or spec.seed_index or not isinstance(result, dict):
            continue
        try:
            profile = run_isolated(gradient_profile, str(Path(spec.out_dir) / "train" / "best.pt"),
                                   spec.features_dir, seed=spec.train_config.seed, timeout_s=config.long_timeout_s)
        except CellError as err:
            if log:
                log(f"{ROW}/{run.family}: gradient profile FAILED {str(err).splitlines()[0]}")
            continue
        out[run.family] = {"distance": top, "frames": prepared.num_frames[top],
                           "visible": [top, prepared.num_frames[top] - 1 - top], **profile}
    return out
