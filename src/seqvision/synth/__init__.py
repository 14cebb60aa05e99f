"""The built-in synthetic benchmark: coloured shapes doing one of a dozen activities, with captions.

``python -m seqvision.synth --out data`` writes MP4 clips and PNG stills plus MSR-VTT, UCF101 and COCO
style annotations (layout and schemas: docs/data.md). Output bytes depend only on the config.
"""

from .events import EVENT_CLASSES, REVERSAL_PAIRS, GenerationError
from .generate import OutputFolderError, Summary, generate

__all__ = ["EVENT_CLASSES", "REVERSAL_PAIRS", "GenerationError", "OutputFolderError", "Summary", "generate"]
