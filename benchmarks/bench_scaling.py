"""Cost as tasks grow (T = 1..20): ``python benchmarks/bench_scaling.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.scaling`.
"""

from surgery_edge.bench.scaling import main

if __name__ == "__main__":
    main()
