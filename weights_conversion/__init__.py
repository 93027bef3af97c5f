"""Checkpoint converters: source-framework files -> Flax variable pytrees.

Every converter is a pure ``dict -> pytree`` function; reading files needs no torch or caffe.
Layout changes live in :mod:`fgloc.weights.io`, and every result passes through
:func:`fgloc.weights.io.strict_merge`, which names each missing, unexpected or
mis-shaped key.
"""
