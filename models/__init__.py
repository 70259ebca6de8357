"""Bundled models (diffusers layout, in the hyphenated folders) and the code that trains and judges them.

Not part of the installed library: run from the repository root, e.g.
``python -m models.digits_dit.train --out models/digits-dit``.
"""
