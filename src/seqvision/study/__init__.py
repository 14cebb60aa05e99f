"""The seed's table, measured (docs/study.md): rows 2 (parallelism), 3 (compute and memory vs N) and 4 (inductive
bias: accuracy vs training-set size).

- ``measure``     peak memory, fresh processes, the :class:`~seqvision.study.measure.Cell` record
- ``cells``       the variants and the cell workers (training step, streaming step), interleaved repeats
- ``fit``         power-law fits with bootstrap intervals, verdicts
- ``complexity``  row 3: training and streaming cost vs N
- ``parallelism`` row 2: critical paths, thread speedups, the GPU token-budget run
- ``bias``        row 4: trainings on nested training subsets, crossovers, samples to a target accuracy
- ``presets``     ``StudyConfig`` and the ci / default / gpu presets
- ``params``      params.yaml's ``study:`` section -> ``StudyConfig``
- ``run``         the row registry (``ROWS``), one row -> ``{row}.json``, figures, ``run_study``
- ``report``      "The seed's table, measured": study.md, study.html, the cells as MLflow child runs
- ``figures``, ``__main__``  PNGs, ``python -m seqvision.study``
"""
