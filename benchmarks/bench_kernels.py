"""The fused correction kernel against PyTorch: ``python benchmarks/bench_kernels.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.kernels`.
"""

from surgery_edge.bench.kernels import main

if __name__ == "__main__":
    main()
