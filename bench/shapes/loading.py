"""Load time and peak memory of a shape's pipeline directory, with and without ``accelerate``.

Without ``accelerate`` diffusers cannot create a model's weights empty and fill them from the file
(``low_cpu_mem_usage``): it warns, initializes every weight randomly, then copies the checkpoint over
it. Each load runs in a fresh process so its peak resident memory is its own; "without" hides the
installed ``accelerate`` from diffusers in that process (what a machine without it does). After the
load every weight is read once, so weights mapped from the file but not yet read count too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

from bench.shapes.build import save_pipeline
from bench.shapes.catalog import ModelShape

# runs in a child process. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a large
# process would report its parent's peak.
_CHILD = """
import importlib.util, json, sys, time

path, use_accelerate = sys.argv[1], sys.argv[2] == "1"
if not use_accelerate:
    find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "accelerate" else find_spec(name, *a)
import diffusers, torch

diffusers.utils.logging.set_verbosity_error()


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


before = status("VmRSS")
began = time.perf_counter()
pipe = diffusers.DiffusionPipeline.from_pretrained(path)
seconds = time.perf_counter() - began
with torch.no_grad():
    for parameter in pipe.transformer.parameters():
        parameter.sum()
weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
print(json.dumps({"accelerate": diffusers.utils.is_accelerate_available(), "load_seconds": seconds,
                  "peak_rss_bytes": status("VmHWM"), "rss_before_load_bytes": before,
                  "transformer_bytes": weights}))
"""


def measure_loading(
    shape: ModelShape, layers: int | None, seed: int, text_tokens: int | None = None
) -> list[dict[str, Any]]:
    """Save the shape's pipeline to a temporary directory and load it in fresh processes, without and
    (when it is installed) with ``accelerate``."""
    try:
        import accelerate  # noqa: F401

        settings = (False, True)
    except ImportError:
        settings = (False,)
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench-shapes-{shape.name}-") as directory:
        save_seconds = save_pipeline(shape, directory, layers, seed, text_tokens)
        for use_accelerate in settings:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, directory, "1" if use_accelerate else "0"],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update(shape=shape.name, build_and_save_seconds=save_seconds)
            rows.append(row)
    return rows
