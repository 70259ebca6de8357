"""``python -m bench.shapes``: the cache and the engine at published model shapes with random weights.

The bundled models are tiny (64-256 tokens, 3M parameters), where fixed per-call costs dominate. This
benchmark builds the real diffusers transformer classes at the published configs of DiT-XL/2,
PixArt-alpha 1024, SD3-medium and a reduced-depth Flux-dev (seeded random weights; nothing is
downloaded), runs a few denoising steps through the serving engine's own code (``FamilyRunner``) and
FastCache, and reports per shape what the saved MACs become in wall-clock, what the cache costs
alone, and how much memory its per-sample state takes.
"""
