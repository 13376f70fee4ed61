"""The ``mixjax`` command and the library behind it (not imported by ``import mixjax``).

* :mod:`~mixjax.app.cli`: ``mixjax run | report | eval | compress``;
* :mod:`~mixjax.app.settings`: the settings of ``mixjax run``, one dataclass per section;
* :mod:`~mixjax.app.config`: a run's configuration (task defaults, TOML, flags), checked;
* :mod:`~mixjax.app.pipeline`: :func:`mixjax.app.pipeline.run`, the whole job (the image
  pipeline); :mod:`~mixjax.app.lm`, the language-model pipeline (``--task lm``);
  :mod:`~mixjax.app.stages`, one stage of either; :mod:`~mixjax.app.common`, what both share;
  :mod:`~mixjax.app.pruning`, the kernels the image pipeline prunes;
* :mod:`~mixjax.app.evaluate`: an artifact's metadata, evaluation and integer-path timing;
* :mod:`~mixjax.app.compress`: ``mixjax compress``, one-shot compression of a run's float model;
* :mod:`~mixjax.app.plots`: the PNG plots of a report.
"""

__all__: list[str] = []
