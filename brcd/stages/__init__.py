"""brcd's reusable stages, each a function of a small typed input and a :class:`Context`:

* :func:`train_teacher` (:class:`TeacherInput` → :class:`TeacherResult`) — the teacher;
* :func:`build_masks` (:class:`MasksInput` → :class:`MasksResult`) — clusters and bit masks;
* :func:`distill` (:class:`DistillInput` → :class:`DistillResult`) — a student, with any
  registered objective (:data:`brcd.losses.METHODS`);
* :func:`encode` / :func:`load_model` — codes of images by a checkpoint;
* :func:`evaluate` (:class:`EvalInput` → ``{"teacher", "sshp", "ashp"}``) — test retrieval;
* :func:`run_students` — many distill runs in worker processes;
* :mod:`brcd.report` renders the results. :mod:`brcd.task` composes the stages from a
  ``Config``; each input has ``from_config``, and :func:`make_context` builds the context.
"""

from .context import Context, OwnLoss, make_context
from .distill import DistillInput, DistillResult, distill
from .encode import (
    build_model,
    encode,
    encode_images,
    encode_views,
    load_model,
    resolve_device,
    shared_backbone_codes,
)
from .evaluate import EvalInput, evaluate, retrieval_map
from .masks import MasksInput, MasksResult, build_masks, mask_stats
from .students import StudentJob, run_students
from .teacher import TeacherInput, TeacherResult, train_teacher
from .views import FeatureBank, ViewCache, student_feature_bank, view_cache

__all__ = [
    "Context",
    "OwnLoss",
    "make_context",
    "TeacherInput",
    "TeacherResult",
    "train_teacher",
    "MasksInput",
    "MasksResult",
    "build_masks",
    "mask_stats",
    "DistillInput",
    "DistillResult",
    "distill",
    "EvalInput",
    "evaluate",
    "retrieval_map",
    "encode",
    "encode_images",
    "encode_views",
    "shared_backbone_codes",
    "load_model",
    "build_model",
    "resolve_device",
    "StudentJob",
    "run_students",
    "ViewCache",
    "view_cache",
    "FeatureBank",
    "student_feature_bank",
]
