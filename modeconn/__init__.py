"""modeconn: low-loss paths between trained networks, served as ensembles or merged models.

The public names below are imported lazily (PEP 562), so that light modules such as
:mod:`modeconn.runtime` (onnxruntime only) can be used without importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "connect": "modeconn.methods",
    "align": "modeconn.matching",
    "weight_matching": "modeconn.matching",
    "AlignmentResult": "modeconn.matching",
    "infer_spec": "models.infer",
    "InferredSpec": "models.infer",
    "METHODS": "modeconn.methods",
    "Path": "modeconn.paths",
    "Bezier": "modeconn.paths",
    "PolyChain": "modeconn.paths",
    "PointSet": "modeconn.paths",
    "linear": "modeconn.paths",
    "load_data": "modeconn.data",
    "Dataset": "modeconn.data",
    "load_checkpoint": "modeconn.checkpoint",
    "save_checkpoint": "modeconn.checkpoint",
    "load_artifact": "modeconn.artifact",
    "save_artifact": "modeconn.artifact",
    "PathArtifact": "modeconn.artifact",
    "evaluate_path": "modeconn.evaluate",
    "fit_artifact": "modeconn.pipeline",
    "train_model": "modeconn.train",
    "TrainConfig": "modeconn.train",
    "recompute_bn": "modeconn.bn",
    "ensemble_predict": "modeconn.ensemble",
    "evaluate_ensemble": "modeconn.ensemble",
    "merge_at": "modeconn.merge",
    "merged_model": "modeconn.merge",
    "export_onnx": "modeconn.export",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'modeconn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
