"""The engine against eight separate experts: ``python benchmarks/bench_engine.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.engine`; its options are those of
``surgery-edge bench`` (:mod:`surgery_edge.cli.bench`), one set for both.
"""

from surgery_edge.cli.bench import script

if __name__ == "__main__":
    script()
