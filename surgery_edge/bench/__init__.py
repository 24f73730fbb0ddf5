"""Benchmarks as a library: ``benchmarks/*.py`` and ``surgery-edge bench`` are thin entry points.

* :mod:`~surgery_edge.bench.timing`: interleaved rounds of ``torch.utils.benchmark``, CUDA graphs;
* :mod:`~surgery_edge.bench.flops`: analytical FLOP counts, bytes moved and weight bytes;
* :mod:`~surgery_edge.bench.roofline`: the device's peaks, measured rates, roofline times;
* :mod:`~surgery_edge.bench.env`: the environment stored with every result (threads, load,
  caches, driver);
* :mod:`~surgery_edge.bench.report`: the JSON record writer, Markdown tables, the engine report
  (with :mod:`~surgery_edge.bench.ratios`, the ratios beside their ceilings, and
  :mod:`~surgery_edge.bench.plots`);
* :mod:`~surgery_edge.bench.engine`: the engines against eight experts on the same paths (its
  configurations and models in :mod:`~surgery_edge.bench.workloads`, its paths in
  :mod:`~surgery_edge.bench.runners`, peak memory per configuration in a process of its own in
  :mod:`~surgery_edge.bench.memory`, planned and read back in
  :mod:`~surgery_edge.bench.engine_memory`);
* :mod:`~surgery_edge.bench.kernels`, :mod:`~surgery_edge.bench.training`,
  :mod:`~surgery_edge.bench.decode`, :mod:`~surgery_edge.bench.onnx_sizes`: the fused kernel,
  surgery training speed, dataset decoding, ONNX file sizes;
* :mod:`~surgery_edge.bench.serve`: serving under load through Triton (its load in
  :mod:`~surgery_edge.bench.serve_load`, its measurements in
  :mod:`~surgery_edge.bench.serve_measure`, its report in :mod:`~surgery_edge.bench.serve_report`);
  :mod:`~surgery_edge.bench.one_graph`: the eight experts as one model, the fairest baseline;
* :mod:`~surgery_edge.bench.proc`: CPU time, stolen time, memory, process trees, load, versions;
* :mod:`~surgery_edge.bench.gpu`: the GPU run (``benchmarks/gpu/run.sh``), every step budgeted
  (its targets in :mod:`~surgery_edge.bench.gpu_targets`).

Each benchmark module has a ``main(argv)``, except the engine benchmark, whose command line is
``surgery-edge bench`` (:mod:`surgery_edge.cli.bench`; its names and defaults, torch-free, in
:mod:`~surgery_edge.bench.choices`); :mod:`~surgery_edge.bench.replot` draws a record's
plots again from its JSON. Importing any of them imports neither Triton nor
matplotlib nor onnxruntime, and does not initialise CUDA.
"""
