"""The BentoML service of modeconn: ensembles along low-loss paths and merged models over HTTP.

``bentoml serve service.service:ModeConnService``; see :mod:`service.service`. Nothing here
imports torch: the worker runs prebuilt ONNX graphs with onnxruntime.
"""
