"""Model diagnostics from the CNN course notes: layer summary (output sizes, parameters,
multiply-accumulates), dead units of the embedding layer, and headless matplotlib plots
(learning curves, first-layer filters, weight histograms, augmentation grids).

Modules:
    :mod:`diagnostics.summary`: Keras-style per-layer table with analytic output shapes.
    :mod:`diagnostics.dead_units`: fraction of embedding units that never fire (re-exported
        from :mod:`training.dead_units`, which the trainer uses).
    :mod:`diagnostics.plots`: PNG figures (matplotlib, Agg canvas; no display needed);
        :mod:`diagnostics.histograms` holds the weight histograms.
    :mod:`diagnostics.viz`: the ``cnn-codes viz`` figures from run directories.

Imports go one way: :mod:`diagnostics` uses :mod:`training`, never the reverse.
"""
