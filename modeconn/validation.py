"""One-line descriptions of pydantic validation errors, for files, options and requests.

Torch-free, so that the CLI's help and the service can use it without loading torch.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["problems", "validate"]

M = TypeVar("M", bound=BaseModel)


def problems(err: ValidationError, limit: int = 5) -> str:
    """``"field.sub: message; other: message"`` for the first ``limit`` errors of ``err``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in err.errors()[:limit]
    )


def validate(cls: type[M], values: dict, what: str) -> M:
    """``cls(**values)``, or a ``ValueError`` that names ``what``, the bad fields and the valid ones."""
    try:
        return cls(**values)
    except ValidationError as err:
        valid = ", ".join(cls.model_fields)
        raise ValueError(f"bad {what}: {problems(err)} (options: {valid})") from err
