"""``python -m bench.cache``."""

from bench.cache.cli import main

main()
