"""``python -m bench.cache``: FastCache against its peers on one DiT pipeline: speed, compute, fidelity.

One module per job:

* ``variants``: the rows (each method at each setting) and how each attaches to a transformer;
* ``schedules``: TaylorSeer's fixed schedules (warm-ups x intervals), its best warm-up, the best
  fixed schedule of a grid;
* ``instrument``: FLOP counting and the timers behind ``overhead_fraction``;
* ``runner``: loading the pipelines, generating the fixed images, measuring each row;
* ``report``: the JSON rows, FastCache's margins, the table and the Pareto plot;
* ``grid``, ``grid_report``: ``--grid``, cells of steps x guidance, its table and plot;
* ``cli``: the command line (``parse_args``, ``main``); what each figure means is in its docstring.
"""

from bench.cache.cli import main, parse_args
from bench.cache.instrument import TransformerFlops, TransformerTimer, overhead_fraction
from bench.cache.report import ROW_KEYS, fastcache_margins, plot_pareto
from bench.cache.variant import Variant
from bench.cache.variants import METHOD_NAMES, build_variants

__all__ = [
    "METHOD_NAMES",
    "ROW_KEYS",
    "TransformerFlops",
    "TransformerTimer",
    "Variant",
    "build_variants",
    "fastcache_margins",
    "main",
    "overhead_fraction",
    "parse_args",
    "plot_pareto",
]
