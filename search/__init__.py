"""Nearest-neighbour search and near-duplicate detection over CNN codes (FAISS).

Torch-free (FAISS, numpy, pyarrow for reading batch-job output). Built on what exists:

* :mod:`search.sources` reads the Parquet output of ``cnn-codes embed`` (:mod:`batch.job`)
  in bounded chunks and refuses to mix model versions or layers;
* :mod:`search.build` builds an index folder from it (``cnn-codes index build``) and
  publishes it atomically, with a manifest (:mod:`search.manifest`) that pins the model
  version the codes came from and records recall@10 against exact search;
* :mod:`search.index` opens an index folder and answers k-nearest-neighbour queries (the
  ``cnn-codes index query`` command and the service's ``POST /search``);
* :mod:`search.dedup` groups near-duplicates (``cnn-codes dedup``);
* :mod:`search.retrieval` measures kNN accuracy and mAP of a model's codes
  (``cnn-codes eval retrieval``).

An index folder::

    INDEX/manifest.json   model name, version, ONNX sha256, layer, dim, count, kind, params,
                          build seconds, recall@10 vs exact search (:class:`IndexManifest`)
    INDEX/index.faiss     the FAISS index (inner product of unit vectors = cosine)
    INDEX/paths.txt       row -> image path, one per line (row i = FAISS id i)
"""

import logging

from search.manifest import (INDEX_FILE, KINDS, MANIFEST_FILE, PATHS_FILE, IndexManifest,
                             read_manifest)

# FAISS logs at INFO which CPU-feature build it loads (three lines per process): not news.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__all__ = ["INDEX_FILE", "KINDS", "MANIFEST_FILE", "PATHS_FILE", "IndexManifest",
           "read_manifest"]
