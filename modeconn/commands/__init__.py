"""Sub-commands of the ``modeconn`` CLI, one module each (see :mod:`modeconn.cli`)."""
