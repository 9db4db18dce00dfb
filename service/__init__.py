"""The service around ``dino_core``: config, storage, tracking, data, training on Ray,
sweeps, evaluation, cluster jobs and the ``dino`` command line.

Imports run downwards only (``tests/test_import_graph.py`` checks it)::

    cli                                  the `dino` command, one module per command group
    sweep                                Ray Tune over training runs
    train, evaluate                      the training driver and loop; evaluations, export
    data, cluster, devtools              datasets and loaders; job submission; local stack
    config, storage, tracking            typed config; fsspec storage and checkpoints; MLflow
    errors                               the error classes (a leaf)
    dino_core                            the method, plain PyTorch
"""
