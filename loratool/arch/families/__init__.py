"""Name mappings that are algorithmic rather than rename tables (those are an entry's ``renames``): one module per family (or per block structure that
several families share), named by the ``naming`` field of an entry. Each may define ``original_to_diffusers``,
``diffusers_to_original``, ``ORIGINAL_ROOTS`` (the first names of its single-file paths), ``SWAPPED`` (diffusers
paths whose single-file weight holds its row halves swapped) and ``<layout>_to_diffusers`` for a layout that
only this family has (XLabs for Flux)."""
