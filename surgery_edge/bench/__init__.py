"""Benchmarks as a library: ``benchmarks/*.py`` and ``surgery-edge bench`` are thin entry points.

* :mod:`~surgery_edge.bench.timing`: warm-up, repeated calls, synchronisation, CUDA graphs;
* :mod:`~surgery_edge.bench.flops`: analytical FLOP counts and weight bytes;
* :mod:`~surgery_edge.bench.env`: the environment stored with every result;
* :mod:`~surgery_edge.bench.report`: the JSON record writer, Markdown tables, the engine report
  (with :mod:`~surgery_edge.bench.ratios` and :mod:`~surgery_edge.bench.plots`);
* :mod:`~surgery_edge.bench.engine`: the engine against eight experts (its configurations and
  models in :mod:`~surgery_edge.bench.workloads`, its paths in :mod:`~surgery_edge.bench.runners`);
* :mod:`~surgery_edge.bench.kernels`, :mod:`~surgery_edge.bench.training`,
  :mod:`~surgery_edge.bench.decode`, :mod:`~surgery_edge.bench.onnx_sizes`: the fused kernel,
  surgery training speed, dataset decoding, ONNX file sizes.

Each benchmark module has a ``main(argv)``. Importing any of them imports neither Triton nor
matplotlib nor onnxruntime, and does not initialise CUDA.
"""
