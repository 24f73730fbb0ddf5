"""Runs: a run directory's layout, its configuration, and the stages that fill it.

- :mod:`~surgery_edge.run.layout`: :class:`RunLayout`, the paths of a run directory and what
  its checkpoints say (tasks, class names, architecture, the model of a merge + adapters);
- :mod:`~surgery_edge.run.config`: :class:`RunConfig`, the validated YAML / JSON settings;
- :mod:`~surgery_edge.run.state`: :class:`Run` (a run directory and what its stages made), the
  suite and experts it starts from, and the rules the stages share (the unlabelled split);
- :mod:`~surgery_edge.run.merge`, :mod:`~surgery_edge.run.surgery`,
  :mod:`~surgery_edge.run.evaluate`: the stages that merge, train adapters and evaluate;
- :mod:`~surgery_edge.run.pipeline`: ``run_pipeline``, the whole flow (imported by the CLI only);
- :mod:`~surgery_edge.run.experts`: pretraining and fine-tuning the built-in suite's experts;
- :mod:`~surgery_edge.run.recipe`: runs over the user's own checkpoints and datasets;
- :mod:`~surgery_edge.run.export`: ``surgery-edge export`` (engines from the checkpoints only);
- :mod:`~surgery_edge.run.engines`: the demo's export-and-parity stage.

This package sits on top of the library (models, data, merging, surgery, evaluation, export);
nothing below it imports it. The submodules are not imported here.
"""
