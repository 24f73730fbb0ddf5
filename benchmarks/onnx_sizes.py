"""ONNX file sizes of the engines against one expert: ``python benchmarks/onnx_sizes.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.onnx_sizes`.
"""

from surgery_edge.bench.onnx_sizes import main

if __name__ == "__main__":
    main()
