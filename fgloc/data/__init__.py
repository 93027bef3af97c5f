"""Datasets and input pipelines.

* :mod:`fgloc.data.images` -- robust image decoding to ``uint8 (H, W, 3)`` RGB.
* :mod:`fgloc.data.cub` -- CUB-200-2011 with the 15 part keypoints: ``read_cub`` and the TFDS
  builder ``cub200_2011_parts`` (array_record, no TensorFlow needed).
* :mod:`fgloc.data.imagenet` -- ILSVRC validation labels and boxes (wsolevaluation text files or
  the official XML files): ``read_imagenet_val``.
* :mod:`fgloc.data.pipeline` -- grain pipeline: decode, resize / box-crop with matching box and
  keypoint transforms, batch.

Submodules are imported on demand (``cub`` pulls in tensorflow_datasets, which is slow to
import).
"""
