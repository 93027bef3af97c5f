"""Map → box: one rule family, with connectivity (4 or 8) as a parameter, on host and on device.

Rules (``RULES``), each over the foreground ``map > threshold`` of one map:

* ``"largest"`` — the CAM paper's rule (Zhou et al. 2016, paper 003, Sec. 3.1): "segment the
  regions of which the value is above 20% of the max value of the CAM. Then we take the
  bounding box that covers the largest connected component". The largest component by pixel
  count; a tie in size goes to the component whose first pixel comes first in row-major order.
* ``"all"`` — the box of every connected component (MaxBoxAccV2, Choe et al. 2020; used by
  `fgloc.metrics.MaxBoxAccV2` through `fgloc.metrics.boxes_at_thresholds`).
* ``"released"`` — the CAM authors' released box generator (metalbubble/CAM
  ``bboxgenerator/dt_box.cpp``), `cam_boxes_released` (its docstring lists every difference).

Entry points:

* `map_boxes` — THE map → box function: one ``(H, W)`` map, any number of thresholds in one
  `scipy.ndimage.label` call, any rule and connectivity; host (numpy), ragged output.
* `boxes_in_image` — one box per map (``"largest"`` or ``"released"``), maps optionally
  upsampled first, boxes scaled to each image's pixels; one threshold or a grid of them (a
  threshold sweep and the final boxes use the same function). What the experiments call.
* `boxes_from_maps` — the ``"largest"`` rule batched and jittable on device (for the CLI and
  in-graph use): exactly `map_boxes(rule="largest")` (tests check parity for both
  connectivities) except that a map with no foreground gets the whole-map box. Two paths, one
  jitted computation (no host callback):

  1. *Column runs* (when every column of every map in the batch has at most `RUN_SLOTS` = 4
     vertical runs of foreground, as thresholded CAMs do): the masks are packed 32 rows to a
     uint32 word; run starts and ends are bit operations on the words (``w & ~(w >> 1 | ..)``)
     and the first 4 of each per column come out with ``clz``. Two runs connect only in
     neighbouring columns, where their row intervals overlap (4-connectivity) or touch
     diagonally too (8). Runs are labelled on that graph (``4 · B · w`` nodes, not ``B · h · w``
     pixels): each `lax.while_loop` step takes the min label over the neighbouring runs, hooks
     each run's label to that min (scatter-min) and jumps pointers twice, to a fixed point.
     Sizes are the run lengths summed per label (`jax.ops.segment_sum`); a component's first
     pixel in row-major order is the top pixel of one of its runs, which gives the tie rule.
  2. *Per-pixel propagation* (the fallback, selected by `lax.cond` for the whole batch when a
     column has more runs, e.g. noise or a spiral): labels start as each pixel's row-major
     index; each `lax.while_loop` step takes the min over the 4 (or 8) neighbours, hooks the
     current root to that min (scatter-min) and does one pointer jump ``L ← L[L]``, until
     nothing changes. Labels end as the smallest row-major index in each component (scipy's
     ``ndimage.label`` numbers components in the same order); sizes by
     `jax.ops.segment_sum`; the box from masked min/max. `connected_components` uses it.

  On the 256 CAMs of ``experiments/benchmark_peers.py`` (224 × 224) the run path needs 5
  label steps (9 with one pointer jump per step, 90 without hooking); timings against OpenCV
  are in BENCHMARKS.md (``experiments/benchmark_boxes.py``).

Boxes are ``[x0, y0, x1, y1]`` float pixels, ``x1``/``y1`` exclusive (DEVELOPING.md); a
component covering columns ``a..b`` and rows ``c..d`` gives ``[a, c, b + 1, d + 1]``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from fgloc.maps.resample import resize_maps_host

__all__ = [
    "CONNECTIVITIES",
    "RULES",
    "boxes_from_maps",
    "boxes_in_image",
    "cam_boxes_released",
    "connected_components",
    "map_boxes",
    "scale_boxes",
]

RULES = ("largest", "all", "released")
CONNECTIVITIES = (4, 8)


def _check_connectivity(connectivity: int) -> int:
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    return int(connectivity)


def _structure(connectivity: int) -> np.ndarray:
    """The ``(3, 3)`` `scipy.ndimage.label` structure of 4- or 8-connectivity."""
    return ndimage.generate_binary_structure(2, 1 if _check_connectivity(connectivity) == 4 else 2)


def _labels_one(mask: jax.Array, connectivity: int = 4) -> jax.Array:
    """Flat labels ``(h·w + 1,)`` of one ``(h, w)`` bool mask; background and the sentinel slot
    ``h·w`` hold ``h·w``; a foreground pixel holds the smallest flat index of its component
    (4- or 8-connected)."""
    h, w = mask.shape
    n = h * w
    flat_mask = mask.reshape(-1)
    init = jnp.where(flat_mask, jnp.arange(n, dtype=jnp.int32), n)
    init = jnp.concatenate([init, jnp.array([n], jnp.int32)])

    def neighbour_min(labels: jax.Array) -> jax.Array:
        grid = labels[:n].reshape(h, w)
        pad = jnp.pad(grid, 1, constant_values=n)
        m = jnp.minimum(
            jnp.minimum(grid, jnp.minimum(pad[:-2, 1:-1], pad[2:, 1:-1])),
            jnp.minimum(pad[1:-1, :-2], pad[1:-1, 2:]),
        )
        if connectivity == 8:
            m = jnp.minimum(
                m,
                jnp.minimum(
                    jnp.minimum(pad[:-2, :-2], pad[:-2, 2:]),
                    jnp.minimum(pad[2:, :-2], pad[2:, 2:]),
                ),
            )
        return jnp.where(mask, m, n).reshape(-1)

    def step(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        labels, _ = state
        m = neighbour_min(labels)
        new = labels.at[labels[:n]].min(m)  # hook each pixel's root to its neighbours' minimum
        new = jnp.concatenate([jnp.minimum(new[:n], m), new[n:]])  # elementwise, no scatter
        new = new[new]  # pointer jumping
        return new, jnp.any(new != labels)

    labels, _ = jax.lax.while_loop(lambda s: s[1], step, (init, jnp.array(True)))
    return labels


def connected_components(masks: jax.Array, connectivity: int = 4) -> jax.Array:
    """4- or 8-connected component labels of a batch of binary masks, on device.

    Args:
      masks: ``(B, h, w)`` bool.
      connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).
    Returns:
      ``(B, h, w)`` int32: ``-1`` on background; on foreground the row-major flat index
      ``y·w + x`` of the component's first pixel (so sorting the distinct labels gives
      `scipy.ndimage.label`'s numbering).
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (B, h, w), got shape {masks.shape}")
    _, h, w = masks.shape
    labels_one = functools.partial(_labels_one, connectivity=_check_connectivity(connectivity))
    labels = jax.vmap(labels_one)(masks.astype(bool))[:, : h * w].reshape(masks.shape)
    return jnp.where(masks.astype(bool), labels, -1)


def _box_one(m: jax.Array, threshold: float | jax.Array, connectivity: int) -> jax.Array:
    """The general (per-pixel propagation) box of one ``(h, w)`` map: the fallback of
    `boxes_from_maps` for maps with more than `RUN_SLOTS` runs in a column."""
    h, w = m.shape
    n = h * w
    mask = m > threshold * jnp.max(m)
    labels = _labels_one(mask, connectivity)[:n]
    sizes = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.int32), labels, num_segments=n + 1)
    best = jnp.argmax(sizes[:n])  # first maximum = lowest label among equal sizes
    sel = (labels == best) & mask.reshape(-1)
    idx = jnp.arange(n)
    rows, cols = idx // w, idx % w
    x0 = jnp.min(jnp.where(sel, cols, w))
    x1 = jnp.max(jnp.where(sel, cols, -1)) + 1
    y0 = jnp.min(jnp.where(sel, rows, h))
    y1 = jnp.max(jnp.where(sel, rows, -1)) + 1
    box = jnp.stack([x0, y0, x1, y1]).astype(jnp.float32)
    whole = jnp.array([0.0, 0.0, w, h], jnp.float32)
    return jnp.where(jnp.any(mask), box, whole)


#: Runs (maximal vertical stretches of foreground) per column that the fast path of
#: `boxes_from_maps` holds; a batch with a column of more runs takes the per-pixel path.
RUN_SLOTS = 4


def _pack_columns(mask: jax.Array) -> jax.Array:
    """``(B, h, w)`` bool -> ``(ceil(h / 32), B, w)`` uint32 words: row ``32 i + j`` of each
    column is bit ``31 - j`` (most significant first) of word ``i``; rows past ``h`` are 0."""
    b, h, w = mask.shape
    nw = -(-h // 32)
    mask = jnp.pad(mask, ((0, 0), (0, nw * 32 - h), (0, 0)))
    shifts = (31 - jnp.arange(32, dtype=jnp.uint32)).reshape(1, 1, 32, 1)
    bits = mask.reshape(b, nw, 32, w).astype(jnp.uint32) << shifts
    words = jnp.sum(bits, axis=2, dtype=jnp.uint32)  # distinct bits: the sum is the OR
    return jnp.swapaxes(words, 0, 1)


def _first_rows(words: jax.Array, slots: int, h: int) -> tuple[jax.Array, jax.Array]:
    """Rows of the first ``slots`` set bits of each column of packed ``words`` ``(..., nw, B,
    w)`` (`_pack_columns` layout): ``(slots, ..., B, w)`` int32 ascending, ``h`` where a column
    has fewer; and ``(..., B, w)`` bool, whether a column has more set bits than ``slots``."""
    nw = words.shape[-3]
    axis = words.ndim - 3
    index = jnp.arange(nw, dtype=jnp.int32).reshape((1,) * axis + (nw, 1, 1))
    rows = []
    for _ in range(slots):
        nonzero = words != 0
        first = jnp.argmax(nonzero, axis=axis, keepdims=True).astype(jnp.int32)
        word = jnp.max(jnp.where(index == first, words, jnp.uint32(0)), axis=axis, keepdims=True)
        bit = jax.lax.clz(word).astype(jnp.int32)  # 32 where the column is exhausted
        rows.append(jnp.squeeze(jnp.where(bit < 32, first * 32 + bit, h), axis))
        top = jnp.uint32(0x80000000) >> jnp.minimum(bit, 31).astype(jnp.uint32)
        words = jnp.where(index == first, words & ~top, words)
    return jnp.stack(rows), jnp.any(words != 0, axis=axis)


def _column_runs(mask: jax.Array, slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The vertical runs of each column of a ``(B, h, w)`` mask: first rows ``(slots, B, w)``,
    exclusive last rows ``(slots, B, w)`` (both ``h`` in unused slots, top to bottom) and
    ``(B, w)`` bool, whether a column has more than ``slots`` runs."""
    h = mask.shape[1]
    words = _pack_columns(mask)
    zero = jnp.zeros_like(words[:1])
    above = (words >> 1) | (jnp.concatenate([zero, words[:-1]]) << 31)  # the pixel above
    below = (words << 1) | (jnp.concatenate([words[1:], zero]) >> 31)
    # a run starts where the pixel above is background and ends where the one below is
    rows, more = _first_rows(jnp.stack([words & ~above, words & ~below]), slots, h)
    return rows[:, 0], jnp.minimum(rows[:, 1] + 1, h), more[0]


def _run_labels(
    first: jax.Array, stop: jax.Array, connectivity: int
) -> tuple[jax.Array, jax.Array]:
    """Component labels of column runs (`_column_runs`), ``(K, B, w)`` int32, and the number of
    label steps taken (an int32 scalar, for the benchmark): every run gets
    the smallest flat index ``k·B·w + b·w + x`` of the runs of its component (unused slots keep
    their own). Two runs connect only in neighbouring columns, where their row intervals
    overlap (4-connectivity) or touch diagonally too (8). Labels by propagation on the run
    graph: each `lax.while_loop` step takes the min over the neighbouring runs, hooks each
    run's current label to that min (scatter-min) and jumps pointers twice, to a fixed point.
    """
    k, b, w = first.shape
    used = first < stop
    a0, a1, au = first[:, :, :-1], stop[:, :, :-1], used[:, :, :-1]
    if connectivity == 4:
        touch = [(a0 < stop[j][None, :, 1:]) & (first[j][None, :, 1:] < a1) for j in range(k)]
    else:
        touch = [(a0 <= stop[j][None, :, 1:]) & (first[j][None, :, 1:] <= a1) for j in range(k)]
    # touch[j][i, :, x]: run i of column x and run j of column x + 1 are connected
    touch = [t & au & used[j][None, :, 1:] for j, t in enumerate(touch)]
    n = k * b * w
    edge = jnp.full((k, b, 1), n, jnp.int32)

    def step(
        state: tuple[jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        labels, _, steps = state
        from_right = jnp.full((k, b, w - 1), n, jnp.int32)
        from_left = []
        for j in range(k):
            from_right = jnp.minimum(from_right, jnp.where(touch[j], labels[j][None, :, 1:], n))
            from_left.append(jnp.min(jnp.where(touch[j], labels[:, :, :-1], n), axis=0))
        m = jnp.minimum(
            labels,
            jnp.minimum(
                jnp.concatenate([from_right, edge], 2),
                jnp.concatenate([edge, jnp.stack(from_left)], 2),
            ),
        ).reshape(-1)
        m = m.at[labels.reshape(-1)].min(m)  # hook each run's label to its neighbours' min
        m = m[m]  # pointer jumping, twice: on the CAMs of benchmark_peers 5 steps, not 9
        new = m[m].reshape(k, b, w)
        return new, jnp.any(new != labels), steps + 1

    init = jnp.arange(n, dtype=jnp.int32).reshape(k, b, w)
    state = (init, jnp.array(True), jnp.array(0, jnp.int32))
    labels, _, steps = jax.lax.while_loop(lambda s: s[1], step, state)
    return labels, steps


@functools.partial(jax.jit, static_argnames=("connectivity", "slots"))
def _boxes_runs(
    maps: jax.Array, threshold: float | jax.Array, connectivity: int, slots: int = RUN_SLOTS
) -> tuple[jax.Array, jax.Array]:
    """`boxes_from_maps`' boxes by column runs, and whether they are valid: ``(B, 4)`` float32
    and a bool scalar, False when some column of some map has more than ``slots`` runs."""
    _, h, w = maps.shape
    mask = maps > threshold * jnp.max(maps, axis=(1, 2), keepdims=True)
    slots = max(1, min(slots, (h + 1) // 2))  # a column of h pixels has at most ceil(h/2) runs
    first, stop, more = _column_runs(mask, slots)
    used = first < stop
    labels, _ = _run_labels(first, stop, connectivity)
    flat = labels.reshape(-1)
    sizes = jax.ops.segment_sum(jnp.where(used, stop - first, 0).reshape(-1), flat, flat.size)
    size = sizes[flat].reshape(labels.shape)  # pixels in each run's component
    cols = jnp.arange(w, dtype=jnp.int32).reshape(1, 1, w)
    # the first pixel (row-major) of a component is the top pixel of one of its runs
    key = jnp.where(used, first * w + cols, h * w)
    biggest = jnp.max(size, axis=(0, 2), keepdims=True)
    tied = used & (size == biggest)
    first_key = jnp.min(jnp.where(tied, key, h * w), axis=(0, 2), keepdims=True)
    best = jnp.min(jnp.where(tied & (key == first_key), labels, flat.size), (0, 2), keepdims=True)
    sel = used & (labels == best)
    box = jnp.stack(
        [
            jnp.min(jnp.where(sel, cols, w), axis=(0, 2)),
            jnp.min(jnp.where(sel, first, h), axis=(0, 2)),
            jnp.max(jnp.where(sel, cols, -1), axis=(0, 2)) + 1,
            jnp.max(jnp.where(sel, stop, 0), axis=(0, 2)),
        ],
        axis=-1,
    ).astype(jnp.float32)
    whole = jnp.array([[0.0, 0.0, w, h]], jnp.float32)
    box = jnp.where(biggest[0] > 0, box, whole)
    return box, ~jnp.any(more)


@functools.partial(jax.jit, static_argnames="connectivity")
def _boxes(maps: jax.Array, threshold: float | jax.Array, connectivity: int) -> jax.Array:
    """`boxes_from_maps` in map pixels: column runs, or per-pixel propagation for a batch with
    a column of more than `RUN_SLOTS` runs (jitted: one compilation per shape, also eagerly)."""
    boxes, fits = _boxes_runs(maps, threshold, connectivity)
    if (maps.shape[1] + 1) // 2 <= RUN_SLOTS:  # no column can have more runs than slots
        return boxes
    box_one = functools.partial(_box_one, connectivity=connectivity)
    return jax.lax.cond(
        fits,
        lambda m, t, fast: fast,
        lambda m, t, fast: jax.vmap(box_one, in_axes=(0, None))(m, t),
        maps,
        threshold,
        boxes,
    )


def boxes_from_maps(
    maps: jax.Array,
    threshold: float | jax.Array = 0.2,
    image_hw: Sequence[int] | None = None,
    *,
    connectivity: int = 4,
) -> jax.Array:
    """Box of the largest connected region above ``threshold · max`` of each map (paper 003).

    Jittable and batched; see the module docstring for the algorithm (column runs, with the
    per-pixel propagation as the fallback) and the tie rule (equal sizes: the component whose
    first pixel comes first in row-major order). The same boxes as ``map_boxes(m, [threshold ·
    max m], rule="largest", connectivity=connectivity)`` for every map with a foreground pixel.

    Args:
      maps: ``(B, h, w)`` real maps (CAM, sensitivity, ...), any sign.
      threshold: fraction of each map's maximum; foreground is ``map > threshold · max(map)``.
        The paper's value is 0.2.
      image_hw: optional ``(H, W)``: if given, boxes are scaled from map to image pixels with
        `scale_boxes`; otherwise they are in map pixels.
      connectivity: 4 (the default, as the CLI) or 8 (a static Python int).
    Returns:
      ``(B, 4)`` float32 ``[x0, y0, x1, y1]``, ``x1``/``y1`` exclusive. A map with no
      foreground pixel (all equal, or maximum ≤ 0 so nothing exceeds ``threshold · max``)
      gets the whole-map box ``[0, 0, w, h]``.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, h, w), got shape {maps.shape}")
    boxes = _boxes(maps, threshold, _check_connectivity(connectivity))
    if image_hw is not None:
        boxes = scale_boxes(boxes, maps.shape[1:], image_hw)
    return boxes


def scale_boxes(boxes: jax.Array, from_hw: Sequence[int], to_hw: Sequence[int]) -> jax.Array:
    """Rescales ``(..., 4)`` boxes ``[x0, y0, x1, y1]`` from an ``(h, w)`` grid to ``(H, W)``.

    Pixel-edge convention: coordinates are positions of pixel edges (pixel ``i`` spans
    ``[i, i+1)``), so the whole map ``[0, 0, w, h]`` maps to the whole image ``[0, 0, W, H]``:
    ``x' = x · W / w``, ``y' = y · H / h``. This matches resizing the map with half-pixel
    centres (`fgloc.maps.resize_maps`).
    """
    if len(from_hw) != 2 or len(to_hw) != 2:
        raise ValueError(f"from_hw and to_hw must be (H, W) pairs, got {from_hw!r}, {to_hw!r}")
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (..., 4) [x0, y0, x1, y1], got shape {boxes.shape}")
    sx = to_hw[1] / from_hw[1]
    sy = to_hw[0] / from_hw[0]
    factors = jnp.array([sx, sy, sx, sy], dtype=jnp.float32)
    return boxes.astype(jnp.float32) * factors.reshape((1,) * (boxes.ndim - 1) + (4,))


def map_boxes(
    score_map: np.ndarray | jax.Array,
    thresholds: Sequence[float] | np.ndarray,
    *,
    rule: str = "largest",
    connectivity: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Map → boxes for every threshold at once, by one of `RULES` (see the module docstring).

    For ``"largest"`` and ``"all"`` the masks ``score_map > t`` of all thresholds are stacked
    into a ``(T, H, W)`` volume and labelled in one `scipy.ndimage.label` call, connected
    inside each slice (4 or 8 neighbours) and not across slices; `scipy.ndimage.find_objects`
    gives each component's extent. The comparison runs in the map's own float dtype (so a
    float32 map gives exactly the boxes of the float32 device path `boxes_from_maps`).

    Args:
      score_map: one ``(H, W)`` real map.
      thresholds: ``(T,)`` thresholds in the map's units (for the paper's rule, ``t · max``);
        for ``"released"``, the released code's three increasing 8-bit levels (e.g.
        ``(20, 100, 110)``; see `cam_boxes_released`).
      rule: ``"largest"`` (one box per threshold with a foreground, the CAM paper's rule),
        ``"all"`` (every component) or ``"released"``.
      connectivity: 4 or 8 for ``"largest"`` / ``"all"`` (default 4, as the CLI); the
        released rule has its own (8-connected contours and 4-connected holes) and takes
        ``None`` or 8.
    Returns:
      ``boxes`` ``(M, 4)`` float64 ``[x0, y0, x1, y1]`` in map pixels and ``threshold_index``
      ``(M,)`` int64, the threshold each box came from, ascending (an empty mask contributes no
      box). For ``"released"`` all boxes, ranked as the released code ranks them, with index 0.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "released":
        if connectivity not in (None, 8):
            raise ValueError(f"the released rule is 8-connected, got connectivity={connectivity}")
        boxes = cam_boxes_released(score_map, tuple(int(t) for t in thresholds))
        return boxes.astype(np.float64), np.zeros(len(boxes), np.int64)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = _structure(4 if connectivity is None else connectivity)
    m = np.asarray(score_map)
    if m.ndim != 2:
        raise ValueError(f"score_map must be one (H, W) map, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float64)
    thr = np.asarray(thresholds, dtype=m.dtype).reshape(-1)
    masks = m[None] > thr[:, None, None]
    labels = np.zeros(masks.shape, dtype=np.int32)
    ndimage.label(masks, structure=structure, output=labels)
    n = int(labels.max(initial=0))  # components are numbered 1..n in raster order
    if n == 0:
        return np.zeros((0, 4)), np.zeros((0,), dtype=np.int64)
    extents = np.array(
        [
            (sl[0].start, sl[2].start, sl[1].start, sl[2].stop, sl[1].stop)
            for sl in ndimage.find_objects(labels)
        ],
        dtype=np.int64,
    )  # one row per component: (t, x0, y0, x1, y1)
    t_idx, boxes = extents[:, 0], extents[:, 1:].astype(np.float64)
    if rule == "largest":
        area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = np.lexsort((-area, t_idx))  # by threshold, then largest first; stable on ties
        first = np.r_[True, t_idx[order][1:] != t_idx[order][:-1]]
        keep = order[first]
        t_idx, boxes = t_idx[keep], boxes[keep]
    return boxes, t_idx


def boxes_in_image(
    maps: np.ndarray | jax.Array,
    image_sizes: np.ndarray | Sequence[Sequence[int]],
    threshold: float | Sequence[float] | np.ndarray = 0.2,
    *,
    rule: str = "largest",
    connectivity: int | None = None,
    map_size: int | Sequence[int] | None = None,
    released_thresholds: Sequence[int] = (20, 100, 110),
    chunk: int = 64,
) -> np.ndarray:
    """One box per map (and per threshold), in the pixels of the image each map covers.

    Each map is (optionally) bilinearly resized to ``map_size`` (`fgloc.maps.resize_maps`, the
    grid the rule is applied on; the CAM paper boxes maps upsampled to the image), boxed with
    `map_boxes` and scaled to its image: ``x · W / S_w``, ``y · H / S_h`` (`scale_boxes`).

    Args:
      maps: ``(N, h, w)`` maps, each over a whole (squashed) image.
      image_sizes: ``(N, 2)`` ``(H, W)`` of those images.
      threshold: ``"largest"``: a fraction of each map's maximum (foreground
        ``map > threshold · max``), a float or a grid ``(T,)`` swept with one labelling per map.
        Unused by ``"released"``.
      rule: ``"largest"`` (the paper's rule) or ``"released"`` (`cam_boxes_released`'s first
        box).
      connectivity: 4 or 8 for ``"largest"`` (default 4).
      map_size: ``S`` or ``(S_h, S_w)``; ``None`` boxes the maps at their own resolution.
      released_thresholds: the released rule's three 8-bit levels.
      chunk: maps resized per device call (`fgloc.maps.resample.resize_maps_host`).
    Returns:
      ``(N, 4)`` float64 ``[x0, y0, x1, y1]`` (``(N, T, 4)`` for a threshold grid), exclusive
      ends, image pixels. A map with no foreground (or no released box) gets the whole image.
    """
    if rule not in ("largest", "released"):
        raise ValueError(f"one box per map needs rule 'largest' or 'released', got {rule!r}")
    if np.ndim(maps) != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {np.shape(maps)}")
    n = np.shape(maps)[0]
    sizes = np.asarray(image_sizes, np.float64).reshape(-1, 2)
    if sizes.shape[0] != n:
        raise ValueError(f"{n} maps but {sizes.shape[0]} image sizes")
    grid = np.asarray(threshold, np.float32)
    fractions = grid.reshape(-1)
    size = tuple(np.shape(maps)[1:]) if map_size is None else map_size
    heats = resize_maps_host(maps, size, chunk)
    size = heats.shape[1:]
    whole = np.array([0.0, 0.0, size[1], size[0]])
    out = np.zeros((n, fractions.size, 4))
    for i, heat in enumerate(heats):
        if rule == "released":
            boxes, _ = map_boxes(heat, released_thresholds, rule="released")
            out[i] = boxes[0] if len(boxes) else whole
            continue
        out[i] = whole
        boxes, t_idx = map_boxes(
            heat, fractions * heat.max(), rule="largest", connectivity=connectivity
        )
        out[i, t_idx] = boxes
    h, w = sizes[:, 0], sizes[:, 1]
    scale = np.stack([w / size[1], h / size[0], w / size[1], h / size[0]], -1)[:, None, :]
    out = out * scale
    return out[:, 0] if grid.ndim == 0 or rule == "released" else out


def _label(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """`scipy.ndimage.label` labels only (its return type is a union pyright cannot unpack)."""
    result: Any = ndimage.label(mask, structure=structure)
    return np.asarray(result[0])


def _released_boxes_xywh(binary: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``cv::boundingRect`` of every contour ``cv::findContours(CV_RETR_CCOMP)`` finds (OpenCV
    2.4): outer borders of 8-connected foreground components and borders of 4-connected holes,
    after OpenCV 2.4 zeroes the image's 1-pixel frame."""
    fg = binary.copy()
    fg[0, :] = fg[-1, :] = False
    fg[:, 0] = fg[:, -1] = False
    out: list[tuple[int, int, int, int]] = []
    labels = _label(fg, structure=np.ones((3, 3), bool))
    for sl in ndimage.find_objects(labels):
        if sl is not None:
            out.append(
                (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
            )
    # Holes: background 4-components that do not reach the (zeroed) frame. A hole border is
    # the foreground pixels 4-adjacent to the hole, so its bounding rect is the hole's grown by 1.
    bg_labels = _label(~fg)
    frame = np.unique(
        np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]])
    )
    for lab, sl in enumerate(ndimage.find_objects(bg_labels), start=1):
        if sl is None or lab in frame:
            continue
        x, y = sl[1].start - 1, sl[0].start - 1
        out.append((x, y, sl[1].stop - sl[1].start + 2, sl[0].stop - sl[0].start + 2))
    return out


def _dt_erode(binary: np.ndarray) -> np.ndarray:
    """``dt_binary`` + ``cvThreshold(.., 10, 255)`` of ``dt_box.cpp``: keep foreground pixels
    whose Euclidean distance to the nearest background pixel, scaled so the largest is 255 and
    rounded half up, exceeds 10. No background: the image is left as is; no foreground: empty."""
    if not binary.any() or binary.all():
        return binary.copy()
    dist = ndimage.distance_transform_edt(binary)
    dist = np.asarray(dist, np.float64)
    scaled = np.floor(dist * (255.0 / dist.max()) + 0.5)
    return np.clip(scaled, 0, 255) > 10


def cam_boxes_released(
    heatmap: np.ndarray | jax.Array, thresholds: Sequence[int] = (20, 100, 110)
) -> np.ndarray:
    """Boxes by the CAM authors' released box generator (metalbubble/CAM ``dt_box.cpp``).

    What the released pipeline does (``ILSVRC_generate_heatmap.m``, ``generate_bbox.m``,
    ``bboxgenerator/dt_box.cpp``, ``dt.c``), re-implemented here with scipy:

    1. the heatmap (10-crop averaged CAM, resized to the original image) is divided by its
       maximum and written as an 8-bit JPEG: ``g = clip(round(255 · map / max), 0, 255)``
       (here without the JPEG compression);
    2. for each threshold ``t`` in ``thresholds`` (0 < t0 < t1 < t2 < 255, else the binary uses
       its defaults 30, 90, 150): binarise ``g > t``; Euclidean distance transform to the
       nearest background pixel, scaled to 0–255 by its maximum; keep pixels whose scaled
       distance exceeds 10 (an erosion relative to the region's thickness);
    3. every contour of ``cv::findContours(CV_RETR_CCOMP)`` (OpenCV 2.4, which zeroes the
       1-pixel image frame first): outer borders of 8-connected components and hole borders;
       its bounding rect ``(x, y, w, h)``, clamped as in the binary: ``x ∈ [0, W−5]``,
       ``y ∈ [0, H−5]``, ``w ∈ [0, W − x − 5]``, ``h ∈ [0, H − y − 5]`` (x, y unclamped there);
    4. all boxes of all thresholds sorted by area, largest first (stable here; ``std::sort``
       leaves ties in unspecified order);
    5. merged: for each box ``i`` in order, each later box ``j`` whose intersection exceeds
       ``int(0.5 · max(area_i, area_j))`` is erased — and, as in the binary's loop
       (``erase(j)`` then ``++j``), the box that moves into slot ``j`` is skipped.

    The evaluation then uses box 1 ("bbox1") or box 2 ("bbox2"). Differences from the paper's
    rule (``"largest"``: 20% of max, largest connected component): three fixed 8-bit
    thresholds (20/255 ≈ 7.8% of max, not 20%), a distance-transform erosion, 8-connectivity,
    all contours including holes ranked by box area (not pixel count), overlap merging, and a
    5-pixel margin at the right/bottom edge.

    Args:
      heatmap: one ``(H, W)`` real map, ideally already at the original image size.
      thresholds: three increasing 8-bit thresholds.
    Returns:
      ``(N, 4)`` float32 ``[x0, y0, x1, y1]`` (``x1 = x + w`` exclusive) in heatmap pixels,
      ranked as the released code ranks them; ``N = 0`` when the map's maximum is ≤ 0 or it
      has no foreground.
    """
    m = np.asarray(heatmap, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"heatmap must be one (H, W) map, got shape {m.shape}")
    if len(thresholds) != 3:
        raise ValueError(f"thresholds must be three 8-bit levels, got {thresholds!r}")
    t = [int(v) for v in thresholds]
    if not (0 < t[0] < t[1] < t[2] < 255):
        t = [30, 90, 150]  # dt_box.cpp ignores invalid thresholds and keeps its defaults
    H, W = m.shape
    peak = m.max() if m.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros((0, 4), np.float32)
    gray = np.clip(np.floor(255.0 * m / peak + 0.5), 0, 255)

    rects: list[tuple[int, int, int, int]] = []
    for th in t:
        binary = _dt_erode(gray > th)
        for x, y, w, h in _released_boxes_xywh(binary):
            rects.append(
                (
                    min(max(x, 0), W - 5),
                    min(max(y, 0), H - 5),
                    min(max(w, 0), W - x - 5),
                    min(max(h, 0), H - y - 5),
                )
            )
    rects.sort(key=lambda r: -(r[2] * r[3]))

    def big_overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        limit = int(max(a[2] * a[3], b[2] * b[3]) * 0.5)
        ox = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        oy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return ox * oy > limit

    i = 0
    while i < len(rects):
        j = i + 1
        while j < len(rects):
            if big_overlap(rects[i], rects[j]):
                del rects[j]
            j += 1  # the released loop skips the box that moved into slot j
        i += 1
    boxes = np.array([(x, y, x + w, y + h) for x, y, w, h in rects], np.float32)
    return boxes.reshape(-1, 4)
