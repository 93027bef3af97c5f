"""A trained keypoint predictor users can load: photos in, CUB part locations out (paper 2).

A predictor directory (written by :meth:`KeypointPredictor.save`, e.g. by
``experiments/keypoint_fcn_cub.py`` as ``WORKDIR/predictor/``) holds ``predictor.json`` (the
backbone's registry name, the fused layers, the head, the input size, the stride, the decoder
and its options, the heatmap activation, flip test, the test sizes, the part names) and ``params.npz`` (every
variable of the `fgloc.models.keypoint_fcn.KeypointFCN`, backbone included, ``"/"``-joined
keys). Loading rebuilds the model from the registry and checks the arrays strictly against it,
so a directory of another backbone or head fails with the keys that differ.

:meth:`KeypointPredictor.predict_keypoints` takes a list of ``uint8 (H, W, 3)`` photos of any
sizes, squashes each to ``input_size``² (`fgloc.data.pipeline.resize_image`), runs the network
(and on the mirrored photos with left/right parts swapped when ``flip_test``), decodes the
heatmaps (`fgloc.localize.keypoints.decode`; with ``test_sizes`` the heatmaps of the photo squashed
to each of those sizes are first averaged on the ``input_size`` grid,
`fgloc.localize.keypoints.multiscale_average`) and maps the points back to each photo's own
pixels. Coordinates follow the CUB annotations: ``(x, y)`` *pixel indices* (the centre of the
top-left pixel is ``(0, 0)``; matplotlib's ``imshow`` convention), which may lie slightly
outside ``[0, W−1] × [0, H−1]`` by sub-cell decoding; they are clipped into that range.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgloc.data.cub_parts import CUB_PART_NAMES
from fgloc.localize import keypoints as kpt
from fgloc.weights.io import (
    ConversionError,
    flatten,
    load_variables,
    save_variables,
    strict_merge,
)

__all__ = ["FORMAT", "KeypointPredictor", "PredictorError"]

#: ``format`` field of ``predictor.json``.
FORMAT = "fgloc.keypoint_predictor/1"


class PredictorError(ValueError):
    """A directory is not a keypoint predictor, or its parameters do not fit its model."""


@dataclasses.dataclass
class KeypointPredictor:
    """A `KeypointFCN` with its variables and decoding options.

    Attributes:
      model: the `fgloc.models.keypoint_fcn.KeypointFCN` (with its ``backbone``).
      variables: ``{"params": ..., "batch_stats"?: ...}`` of ``model``.
      backbone: registry name of the backbone (``fgloc.pretrained``), for preprocessing and
        for rebuilding the model on load.
      input_size: square side (pixels) every photo is squashed to.
      stride: heatmap stride in input pixels (a number or ``(s_x, s_y)``).
      decoder: ``argmax`` / ``soft_argmax`` / ``dark`` (`fgloc.localize.keypoints.DECODERS`).
      decoder_kwargs: options of the decoder (``window``, ``smooth_sigma``, ...).
      activation: ``sigmoid`` or ``softmax``, what the heatmaps were trained with.
      flip_test: average with the mirrored photo's heatmaps (left/right parts swapped).
      test_sizes: multi-scale test: the input sizes (each a multiple of ``stride``) whose
        heatmaps are averaged on the grid of ``input_size``; ``()`` is ``input_size`` alone.
      part_names: names of the heatmap channels.
      batch_size: photos per forward pass.
    """

    model: Any
    variables: Mapping[str, Any]
    backbone: str
    input_size: int
    stride: float | tuple[float, float]
    decoder: str = "soft_argmax"
    decoder_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    activation: str = "softmax"
    flip_test: bool = True
    test_sizes: tuple[int, ...] = ()
    part_names: tuple[str, ...] = CUB_PART_NAMES
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.decoder not in kpt.DECODERS:
            raise PredictorError(f"decoder must be one of {kpt.DECODERS}, got {self.decoder!r}")
        if self.activation not in kpt.ACTIVATIONS:
            raise PredictorError(
                f"activation must be one of {kpt.ACTIVATIONS}, got {self.activation!r}"
            )
        if int(self.input_size) < 1:
            raise PredictorError(f"input_size must be positive, got {self.input_size}")
        if len(self.part_names) != self.model.num_parts:
            raise PredictorError(
                f"{len(self.part_names)} part names for a model of {self.model.num_parts} parts"
            )
        self.test_sizes = tuple(int(t) for t in self.test_sizes)
        sx, sy = (self.stride, self.stride) if isinstance(self.stride, int | float) else self.stride
        for t in self.test_sizes:
            if t < 1 or t % sx or t % sy:
                raise PredictorError(
                    f"test_sizes: {t} is not a positive multiple of the stride {self.stride} "
                    "(each scale's heatmap must cover its whole input)"
                )
        if self.flip_test:
            self._perm = kpt.flip_permutation(self.part_names)
        self._forward = jax.jit(self._heatmaps_of)

    # ---------------------------------------------------------------------------- files
    def config(self) -> dict[str, Any]:
        """The JSON description saved as ``predictor.json``."""
        stride = self.stride if isinstance(self.stride, int | float) else list(self.stride)
        return {
            "format": FORMAT,
            "backbone": self.backbone,
            "layers": list(self.model.layers),
            "head": [list(h) for h in self.model.head],
            "num_parts": int(self.model.num_parts),
            "resize_method": self.model.resize_method,
            "input_size": int(self.input_size),
            "stride": stride,
            "decoder": self.decoder,
            "decoder_kwargs": dict(self.decoder_kwargs),
            "activation": self.activation,
            "flip_test": bool(self.flip_test),
            "test_sizes": list(self.test_sizes),
            "part_names": list(self.part_names),
        }

    def template(self) -> Any:
        """Abstract variables (shapes) of ``model`` at ``input_size``: what ``params.npz``
        must hold."""
        s = int(self.input_size)
        x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
        return jax.eval_shape(lambda x: self.model.init(jax.random.key(0), x), x)

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Writes ``predictor.json`` and ``params.npz`` into ``directory``; returns it.

        Only the variables the model uses are written (a backbone's unused classifier is
        dropped); PredictorError when one it needs is missing or mis-shaped."""
        want = flatten(self.template())
        have = flatten(jax.device_get(dict(self.variables)))
        try:
            variables = strict_merge(
                self.template(), {k: have[k] for k in want if k in have}, source="variables"
            )
        except ConversionError as err:
            raise PredictorError(f"variables do not fit the model: {err}") from err
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_variables(d / "params.npz", variables)
        (d / "predictor.json").write_text(json.dumps(self.config(), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, batch_size: int = 8) -> KeypointPredictor:
        """Loads a predictor directory (see the module docstring).

        Raises:
          PredictorError: the directory is missing, has no ``predictor.json`` / ``params.npz``,
            the JSON is not a predictor description, or the parameters do not fit the model it
            describes (the message lists the keys).
        """
        from fgloc import registry
        from fgloc.models.keypoint_fcn import KeypointFCN

        d = pathlib.Path(directory)
        if not d.is_dir():
            raise PredictorError(f"{d}: not a directory (expected a keypoint predictor folder)")
        cfg_path, params_path = d / "predictor.json", d / "params.npz"
        for f in (cfg_path, params_path):
            if not f.is_file():
                raise PredictorError(
                    f"{d} is not a keypoint predictor: {f.name} missing (a predictor folder "
                    "holds predictor.json and params.npz, e.g. WORKDIR/predictor/ of "
                    "experiments.keypoint_fcn_cub)"
                )
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as err:
            raise PredictorError(f"{cfg_path}: not JSON ({err})") from err
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise PredictorError(f"{cfg_path}: not a keypoint predictor (format != {FORMAT!r})")
        required = ("backbone", "layers", "head", "num_parts", "input_size", "stride")
        absent = [k for k in required if k not in cfg]
        if absent:
            raise PredictorError(f"{cfg_path}: missing fields {absent}")
        try:
            entry = registry.get(cfg["backbone"])
        except (KeyError, ValueError) as err:
            raise PredictorError(f"{cfg_path}: unknown backbone {cfg['backbone']!r}") from err
        model = KeypointFCN(
            backbone=entry.build(entry.num_classes),
            layers=tuple(cfg["layers"]),
            head=tuple(tuple(int(v) for v in h) for h in cfg["head"]),
            num_parts=int(cfg["num_parts"]),
            resize_method=cfg.get("resize_method", "bilinear"),
        )
        size = int(cfg["input_size"])
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        try:
            template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
        except (KeyError, ValueError, TypeError) as err:
            raise PredictorError(
                f"{cfg_path}: the model it describes cannot be built: {err}"
            ) from err
        try:
            variables = strict_merge(template, load_variables(params_path), source=str(params_path))
        except ConversionError as err:
            raise PredictorError(
                f"{d}: parameters do not fit the model of predictor.json: {err}"
            ) from err
        except (OSError, ValueError) as err:
            raise PredictorError(f"{params_path}: unreadable ({err})") from err
        stride = cfg["stride"]
        return cls(
            model=model,
            variables=jax.tree_util.tree_map(jnp.asarray, variables),
            backbone=cfg["backbone"],
            input_size=size,
            stride=float(stride) if isinstance(stride, int | float) else tuple(stride),
            decoder=cfg.get("decoder", "argmax"),
            decoder_kwargs=cfg.get("decoder_kwargs", {}),
            activation=cfg.get("activation", "sigmoid"),
            flip_test=bool(cfg.get("flip_test", False)),
            test_sizes=tuple(int(t) for t in cfg.get("test_sizes", ())),
            part_names=tuple(cfg.get("part_names", CUB_PART_NAMES)),
            batch_size=batch_size,
        )

    # ------------------------------------------------------------------------ prediction
    def _preprocess(self) -> Any:
        from fgloc import registry
        from fgloc.pretrained import normaliser

        entry = registry.get(self.backbone)
        return normaliser(entry.mean, entry.std)

    def heatmaps(self, batch_uint8: np.ndarray) -> np.ndarray:
        """Heatmap logits ``(B, h, w, P)`` of squashed photos ``uint8 (B, S, S, 3)`` (flip test
        applied when on)."""
        return np.asarray(self._forward(self.variables, jnp.asarray(batch_uint8)))

    def photo_heatmaps(self, photos: Sequence[np.ndarray]) -> np.ndarray:
        """Heatmap logits ``(N, h, w, P)`` on the ``input_size`` grid of ``uint8 (H, W, 3)``
        photos of any sizes: flip test when on, and the mean over ``test_sizes`` when set."""
        from fgloc.data.pipeline import resize_image

        s = int(self.input_size)
        sizes = self.test_sizes or (s,)
        bs = max(1, int(self.batch_size))
        out = []
        for start in range(0, len(photos), bs):
            chunk = [np.asarray(im) for im in photos[start : start + bs]]
            n = len(chunk)
            per_size = []
            for t in sizes:
                batch = np.stack([resize_image(im, (t, t)) for im in chunk])
                if n < bs:  # one compiled shape per size
                    batch = np.concatenate([batch, np.zeros((bs - n, t, t, 3), np.uint8)])
                per_size.append(self.heatmaps(batch)[:n])
            if sizes == (s,):
                out.append(per_size[0])
            else:
                sx, sy = (
                    (self.stride, self.stride)
                    if isinstance(self.stride, int | float)
                    else self.stride
                )
                grid = (round(s / sy), round(s / sx))
                out.append(np.asarray(kpt.multiscale_average(per_size, grid)))
        return np.concatenate(out)

    def _heatmaps_of(self, variables: Any, batch_uint8: jax.Array) -> jax.Array:
        """:meth:`heatmaps` as one traced function (jitted in ``__post_init__``)."""
        x = jnp.asarray(self._preprocess()(batch_uint8), jnp.float32)
        z = self.model.apply(variables, x)[0]
        if self.flip_test:
            zf = self.model.apply(variables, x[:, :, ::-1, :])[0]
            z = kpt.flip_test_average(z, zf, self._perm)
        return z

    def predict_keypoints(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Part locations of each photo.

        Args:
          images: a list of ``uint8 (H, W, 3)`` RGB photos, any sizes (a single ``(N, H, W,
            3)`` array works too).
        Returns:
          ``xy`` ``(N, P, 2)`` float64 ``(x, y)`` pixel indices in each photo's own frame
          (clipped into the photo) and ``confidence`` ``(N, P)`` in [0, 1] (peak probability of
          the part's heatmap).
        Raises:
          ValueError naming the photo for anything that is not ``uint8 (H, W, 3)``.
        """
        from fgloc.data.pipeline import invert_affine, resize_affine, transform_points

        photos = list(images)
        s = int(self.input_size)
        for i, im in enumerate(photos):
            a = np.asarray(im)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3 or min(a.shape[:2]) < 1:
                raise ValueError(f"images[{i}] must be uint8 (H, W, 3), got {a.dtype} {a.shape}")
        p = self.model.num_parts
        if not photos:
            return np.zeros((0, p, 2)), np.zeros((0, p))
        z = self.photo_heatmaps(photos)
        dec = kpt.decode(
            jnp.asarray(z),
            self.stride,
            self.decoder,
            activation=self.activation,
            **dict(self.decoder_kwargs),
        )
        xy = np.asarray(dec.keypoints, np.float64) - 0.5  # continuous -> pixel indices
        xy_all = []
        for i, im in enumerate(photos):
            h, w = np.asarray(im).shape[:2]
            pts = transform_points(xy[i], invert_affine(resize_affine((h, w), (s, s))))
            pts = np.stack([np.clip(pts[:, 0], 0, w - 1), np.clip(pts[:, 1], 0, h - 1)], -1)
            xy_all.append(pts.astype(np.float64))
        conf_all = [np.asarray(dec.confidence, np.float64)]
        return np.stack(xy_all), np.concatenate(conf_all)
