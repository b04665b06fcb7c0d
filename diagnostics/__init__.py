"""Model diagnostics from the CNN course notes: layer summary (output sizes, parameters,
multiply-accumulates), dead units of the embedding layer, and headless matplotlib plots
(learning curves, first-layer filters, weight histograms, augmentation grids), maps and grids
of CNN codes, feature maps and Grad-CAM.

Modules:
    :mod:`diagnostics.summary`: Keras-style per-layer table with analytic output shapes.
    :mod:`diagnostics.dead_units`: fraction of embedding units that never fire (re-exported
        from :mod:`training.dead_units`, which the trainer uses).
    :mod:`diagnostics.plots`: PNG figures (matplotlib, Agg canvas; no display needed);
        :mod:`diagnostics.histograms` holds the weight histograms.
    :mod:`diagnostics.viz`: the ``cnn-codes viz`` figures from run directories.
    :mod:`diagnostics.codes`: t-SNE maps of batch-job codes and nearest-neighbour grids
        (``viz codes``, ``viz neighbours``; torch-free).
    :mod:`diagnostics.convnet`: feature maps and Grad-CAM of one image (``viz activations``,
        ``viz gradcam``), the torch model read from a run, a checkpoint or a published version.

Imports go one way: :mod:`diagnostics` uses :mod:`training`, never the reverse.
"""
