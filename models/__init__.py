"""Network architectures, their registry, and the permutation spec of any network.

Importing this package registers every architecture (``mlp``, ``cnn``, ``resnet20``). The
permutation spec of a network (ours or anyone's) is inferred from its traced graph
(:mod:`models.infer`) and proven on the network (:mod:`models.verify`).
"""

from modeconn.models import cnn, mlp, resnet  # noqa: F401  (imported for their registrations)
from modeconn.models.infer import InferredSpec, infer_spec
from modeconn.models.registry import create_model, list_models, register_model
from modeconn.models.spec import PermutationSpec, apply_permutation, random_permutation
from modeconn.models.verify import check_permutation_invariance

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "PermutationSpec",
    "apply_permutation",
    "random_permutation",
    "infer_spec",
    "InferredSpec",
    "check_permutation_invariance",
]
