"""Retrieval evaluation for binary codes: streaming mAP / precision / PR and the student-teacher
alignment analysis (ISD, NRA@K). SSHP: ``evaluate(student queries,
student database)``; ASHP: ``evaluate(student queries, teacher database)``.

Example:
    >>> import numpy as np
    >>> from brcd.retrieval import evaluate
    >>> q = np.array([[1., 1.]]); db = np.array([[1., 1.], [-1., -1.]])
    >>> evaluate(q, db, np.array([0]), np.array([0, 1]), topk=2).map_at_k
    1.0
"""

from .evaluate import RetrievalMetrics, evaluate, isd, map_at_k, nra
from .index import as_packed

__all__ = ["RetrievalMetrics", "evaluate", "map_at_k", "isd", "nra", "as_packed"]
