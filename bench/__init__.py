"""Benchmarks (not part of the test run; the smoke tests only check their output's structure).

* ``python -m bench.cache``: FastCache (tolerance sweep, default, ablations) against FBCache, TaylorSeer,
  PAB, TeaCache, MagCache, SeaCache and (optional) cache-dit on one DiT pipeline: wall-clock speedup,
  measured MAC fraction, PSNR/SSIM against the uncached image of the same seed, class accuracy and
  digits FID, peak memory. ``--grid``: PSNR (mean, worst image) and MAC fraction over cells of steps x
  guidance, FastCache's default against TaylorSeer's fixed schedules and ``best_fixed_schedule``.
* ``python -m bench.serve``: the HTTP service under open-loop Poisson load: throughput, latency
  percentiles, queue wait and batch sizes, one-at-a-time against continuous batching.

See ``bench/README.md``.
"""
