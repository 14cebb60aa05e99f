"""The built-in synthetic benchmark: coloured shapes doing one of a dozen activities, with captions.

``python -m seqvision.synth --out data`` writes MP4 clips and PNG stills plus MSR-VTT, UCF101 and COCO
style annotations (layout and schemas: docs/data.md). Output bytes depend only on the config.

Import what you need from the modules (``seqvision.synth.events``, ``seqvision.synth.generate``): this package
imports nothing itself, so a stage that only needs the class names (``events``) does not load, or depend on, the
renderer and the video writers.
"""
