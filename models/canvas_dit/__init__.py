"""The canvas DiT (``models/canvas-dit``): one handwritten digit at a random place and size on a 64x64
dark canvas, 256 latent tokens. Its data, its classifier-based judge, its training."""
