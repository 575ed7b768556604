"""Fitting paths: one module per method, one shared state module, one table.

- :mod:`~modeconn.fit.configs`: every method's options (torch-free);
- :mod:`~modeconn.fit.methods`: the table of methods (torch-free);
- :mod:`~modeconn.fit.state`: what every fit shares (resumable state, batch stream, flat
  parameter layout, optimiser state, engine);
- :mod:`~modeconn.fit.objective`: what a fitter minimises (a model on data, or an energy);
- the fitters: :mod:`~modeconn.fit.curves`, :mod:`~modeconn.fit.neb`,
  :mod:`~modeconn.fit.autoneb`, :mod:`~modeconn.fit.geodesic`, :mod:`~modeconn.fit.fge`,
  :mod:`~modeconn.fit.linear`;
- :mod:`~modeconn.fit.connect`: ``connect``, the one entry point to all of them.
"""
