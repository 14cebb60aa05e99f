"""The seed's table, measured (docs/study.md): rows 1 (long-range dependencies: accuracy vs distance), 2
(parallelism), 3 (compute and memory vs N) and 4 (inductive bias: accuracy vs training-set size).

- ``measure``     peak memory, fresh processes, the :class:`~seqvision.study.measure.Cell` record
- ``cellserver``  the fork server the cells are forked from (torch-free: a row's stage starts it first)
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
