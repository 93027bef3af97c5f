"""Application code of the ``fgloc`` command line (jobs, overlay pictures, result files).

Not a library layer: it imports the library and nothing imports it but `fgloc.cli`.
"""
