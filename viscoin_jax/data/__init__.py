"""Data: the embedded synthetic concept data set, TFDS and image-folder sources, transforms, and
the grain input pipeline (`make_dataset` / `make_iterator`, resumable via `iterator_state`)."""

from viscoin_jax.data.pipeline import (AUGMENTATIONS, DATASETS, DataOptions, data_config,
                                       iterator_state, known_datasets, make_dataset, make_iterator,
                                       make_source, resolve_options, restore_iterator,
                                       steps_per_epoch)
from viscoin_jax.data.sources import (ImageFolderSource, TfdsSource, crop_to_bbox, load_image,
                                      open_tfds)
from viscoin_jax.data.synthetic import (VARIANTS, SyntheticConcepts, factor_names, flip_factors,
                                        label_from_factors, make_synthetic_arrays,
                                        measure_factors, render, sample_factors)
from viscoin_jax.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "AUGMENTATIONS", "DATASETS", "DataOptions", "data_config", "iterator_state", "known_datasets",
    "make_dataset", "make_iterator", "make_source", "resolve_options", "restore_iterator",
    "steps_per_epoch", "ImageFolderSource", "TfdsSource", "crop_to_bbox", "load_image",
    "open_tfds", "VARIANTS", "SyntheticConcepts", "factor_names", "flip_factors",
    "label_from_factors", "make_synthetic_arrays", "measure_factors", "render", "sample_factors",
    "EvalTransform", "TrainTransform",
]
