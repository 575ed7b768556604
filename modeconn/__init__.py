"""modeconn: low-loss paths between trained networks, served as ensembles or merged models.

The verbs a user needs, by stage: ``load_data`` / ``load_checkpoint``; ``infer_spec`` and
``align`` (weight matching); ``connect`` (every method of ``METHODS``) and ``fit_artifact``
(fit, evaluate and save); ``evaluate_path``; ``ensemble_predict`` / ``evaluate_ensemble``;
``merge_at``; ``export_onnx``; ``OnnxModel`` to run an exported graph.

Names are imported on first use (PEP 562), so that light modules such as
:mod:`modeconn.runtime` (onnxruntime only) or :mod:`modeconn.formats` load without torch; the
``TYPE_CHECKING`` block makes the same names visible to type checkers and editors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from modeconn.artifact import PathArtifact, load_artifact, save_artifact
    from modeconn.bn import recompute_bn
    from modeconn.checkpoint import load_checkpoint, save_checkpoint
    from modeconn.data import Dataset, load_data
    from modeconn.ensemble import ensemble_predict, evaluate_ensemble
    from modeconn.evaluate import evaluate_path
    from modeconn.export import export_onnx
    from modeconn.fit.connect import connect
    from modeconn.fit.methods import METHODS, make_config
    from modeconn.formats import Manifest
    from modeconn.matching import AlignmentResult, align, weight_matching
    from modeconn.merge import merge_at, merged_model
    from modeconn.models.infer import InferredSpec, infer_spec
    from modeconn.paths import Bezier, Path, PointSet, PolyChain, linear
    from modeconn.pipeline import fit_artifact
    from modeconn.runtime import OnnxModel
    from modeconn.train import TrainConfig, train_model

#: Where each public name lives (must agree with the TYPE_CHECKING imports; tested).
_EXPORTS = {
    "PathArtifact": "modeconn.artifact",
    "load_artifact": "modeconn.artifact",
    "save_artifact": "modeconn.artifact",
    "recompute_bn": "modeconn.bn",
    "load_checkpoint": "modeconn.checkpoint",
    "save_checkpoint": "modeconn.checkpoint",
    "Dataset": "modeconn.data",
    "load_data": "modeconn.data",
    "ensemble_predict": "modeconn.ensemble",
    "evaluate_ensemble": "modeconn.ensemble",
    "evaluate_path": "modeconn.evaluate",
    "export_onnx": "modeconn.export",
    "connect": "modeconn.fit.connect",
    "METHODS": "modeconn.fit.methods",
    "make_config": "modeconn.fit.methods",
    "Manifest": "modeconn.formats",
    "AlignmentResult": "modeconn.matching",
    "align": "modeconn.matching",
    "weight_matching": "modeconn.matching",
    "merge_at": "modeconn.merge",
    "merged_model": "modeconn.merge",
    "Bezier": "modeconn.paths",
    "Path": "modeconn.paths",
    "PointSet": "modeconn.paths",
    "PolyChain": "modeconn.paths",
    "linear": "modeconn.paths",
    "fit_artifact": "modeconn.pipeline",
    "OnnxModel": "modeconn.runtime",
    "TrainConfig": "modeconn.train",
    "train_model": "modeconn.train",
    "InferredSpec": "modeconn.models.infer",
    "infer_spec": "modeconn.models.infer",
}

__all__ = [
    "AlignmentResult",
    "Bezier",
    "Dataset",
    "InferredSpec",
    "METHODS",
    "Manifest",
    "OnnxModel",
    "Path",
    "PathArtifact",
    "PointSet",
    "PolyChain",
    "TrainConfig",
    "align",
    "connect",
    "ensemble_predict",
    "evaluate_ensemble",
    "evaluate_path",
    "export_onnx",
    "fit_artifact",
    "infer_spec",
    "linear",
    "load_artifact",
    "load_checkpoint",
    "load_data",
    "make_config",
    "merge_at",
    "merged_model",
    "recompute_bn",
    "save_artifact",
    "save_checkpoint",
    "train_model",
    "weight_matching",
    "__version__",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'modeconn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
