"""Where routed SurgeryV2's extra time goes as tasks grow:
``python benchmarks/bench_scaling_profile.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.scaling_profile`.
"""

from surgery_edge.bench.scaling_profile import main

if __name__ == "__main__":
    main()
