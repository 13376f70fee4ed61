"""The ``mixjax`` command and the library behind it (not imported by ``import mixjax``).

* :mod:`~mixjax.app.cli`: ``mixjax run | report | eval``;
* :mod:`~mixjax.app.config`: the settings of ``mixjax run`` (defaults, TOML, flags);
* :mod:`~mixjax.app.pipeline`: :func:`mixjax.app.pipeline.run`, the whole job, and
  :mod:`~mixjax.app.stages`, one stage of it;
* :mod:`~mixjax.app.evaluate`: an artifact's metadata, evaluation and integer-path timing;
* :mod:`~mixjax.app.plots`: the PNG plots of a report.
"""

__all__: list[str] = []
