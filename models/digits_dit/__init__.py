"""The bundled digits DiT (``models/digits-dit``): its data, its classifier-based judge, its training."""
