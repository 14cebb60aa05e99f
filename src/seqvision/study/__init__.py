"""The seed's table, measured (docs/study.md): rows 1 (long-range dependencies: accuracy vs distance), 2
(parallelism), 3 (compute and memory vs N) and 4 (inductive bias: accuracy vs training-set size).

- ``measure``     peak memory, fresh processes, the :class:`~seqvision.study.measure.Cell` record
- ``variants``    the model variants and their one width (torch-free: ``check_params`` reads them)
- ``cells``       the cell workers (training step, streaming step), interleaved repeats
- ``fit``         power-law fits with bootstrap intervals, verdicts
- ``complexity``  row 3: training and streaming cost vs N
- ``parallelism`` row 2: critical paths, thread speedups, the GPU token-budget run
- ``bias``        row 4: trainings on nested training subsets, crossovers, samples to a target accuracy
- ``longrange``   row 1: clips rendered once and cropped per distance, controls, length generalisation, gradients
- ``presets``     ``StudyConfig`` and the ci / default / gpu presets
- ``params``      params.yaml's ``study:`` section -> ``StudyConfig``
- ``run``         the row registry (``ROWS``), one row -> ``{row}.json``, ``run_study``
- ``report``      "The seed's table, measured": study.md, study.html, the cells as MLflow child runs
- ``figures``     one PNG per row (``PLOTS``, ``write_figures``): the report's, never imported by a row's stage
- ``__main__``    ``python -m seqvision.study``
"""

# What the cells' fork server imports once (``measure.run_isolated``), so that a fresh cell process starts in
# milliseconds instead of the ~4 s an ``import torch`` takes, and the 4.6 s of the first ``torch.optim.AdamW(...)``,
# which imports torch._dynamo (measured on the 2-core development machine). Here, torch-free: a stage starts the
# server before its own imports (pipelines/study_row.py).
PRELOAD = ["torch", "torch._dynamo", "seqvision.models", "seqvision.mingru", "seqvision.study.cells"]
