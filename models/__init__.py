"""Network architectures, their registry, and their permutation specs.

Importing this package registers every architecture (``mlp``, ``cnn``, ``resnet20``).
"""

from models import cnn, mlp, resnet  # noqa: F401  (imported for their registrations)
from models.registry import create_model, list_models, register_model
from models.spec import PermutationSpec, apply_permutation, random_permutation

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "PermutationSpec",
    "apply_permutation",
    "random_permutation",
]
