"""The three tasks and what each reads: the one typed task -> data mapping of the data layer.

Torch-free, so a stage's main process (argument checks, the train stage's orchestration) can ask which inputs a task
needs without importing torch; :mod:`seqvision.datasets` builds each task's dataset from its :class:`TaskSpec`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Kind = Literal["videos", "images"]


class TaskSpec(NamedTuple):
    """What a task reads: its kind of visual record and its caption corpus (``artifacts/tokens/{corpus}``; None for
    activity, which reads class labels instead)."""

    name: str
    kind: Kind
    corpus: str | None

    @property
    def captioning(self) -> bool:
        return self.corpus is not None


TASKS: dict[str, TaskSpec] = {
    "activity": TaskSpec("activity", "videos", None),
    "image_captioning": TaskSpec("image_captioning", "images", "image"),
    "video_captioning": TaskSpec("video_captioning", "videos", "video"),
}


def task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task``; ``ValueError`` naming the tasks otherwise."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}") from None
