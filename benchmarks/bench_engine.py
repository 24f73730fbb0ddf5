"""The engine against eight separate experts: ``python benchmarks/bench_engine.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.engine`.
"""

from surgery_edge.bench.engine import main

if __name__ == "__main__":
    main()
