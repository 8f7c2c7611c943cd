"""brcd: the slim BRCD trainer (Bit-mask Robust Contrastive Distillation for hashing).

Built only on fasthash, torch, timm and scikit-learn. Python API (each CLI subcommand is one
call; a :class:`brcd.config.Config` drives them all):

* ``brcd.config.load_config(preset_or_yaml, {"dotted.key": value}) -> Config``
  (presets: ``fashion-mnist`` (CPU-sized), ``cifar10`` (the paper's protocol), ``digits``)
* ``brcd.models.create_model(name, bits, *, pretrained, weights, freeze_backbone, head)``
  -> ``HashModel`` (any timm backbone or ``"tiny-cnn"``; ``model(x).codes`` are ±1)
* ``brcd.data.make_splits(cfg.data, seed) -> Splits`` (train / query / database / val);
  ``brcd.data.load_pool(name, root)``, ``prepare_batch``; ``brcd.augment.augment`` / ``view_keys``
* ``brcd.task.train_teacher(cfg) -> Path`` (teacher checkpoint)
* ``brcd.task.build_masks(cfg, teacher=None) -> Path`` (``teacher_masks.pt``: teacher + masks)
* ``brcd.task.distill(cfg, teacher=None) -> Path`` (student checkpoint; ``cfg.distill.method``
  a key of ``brcd.losses.METHODS``: brcd / none / kd-codes / sp / rkd, ablation switches in
  ``cfg.distill``)
* ``brcd.task.evaluate(cfg, student=None, teacher=None) -> {"teacher", "sshp", "ashp"}``
* ``brcd.task.encode(checkpoint, images, view_size) -> ±1 codes [N, L]``;
  ``brcd.task.load_model(checkpoint) -> (HashModel, spec)``
* ``brcd.masks.compute_cluster_masks(codes, train_indices, C, delta=...) -> ClusterMasks``;
  ``brcd.masks.mask_table_from_centroids``, ``assign_clusters``
* ``brcd.losses``: ``cibhash_loss``, ``brcd_distill_loss``, ``kd_codes_loss``, ``sp_loss``,
  ``rkd_distance_loss``; the registries ``METHODS`` (``register_method``) and
  ``brcd.data.DATASETS`` (``register_dataset``)
* ``brcd.stages``: the same pipeline as stage functions of typed inputs and results
  (``train_teacher(TeacherInput, Context) -> TeacherResult``, ``build_masks``, ``distill``,
  ``evaluate``, ``encode``, ``run_students``); ``brcd.report.write_report(out, metrics)``

Files: checkpoints, the view cache and the demo's eval views are written and verified by
:mod:`brcd.files` (plain data, SHA-256 trailer, atomic rename, ``weights_only=True`` loads).

CLI: ``python -m brcd {train-teacher, build-masks, distill, evaluate, encode, demo} --help``;
a user error is one ``error: ...`` line and exit status 2 (``--debug``: the traceback).
"""

__version__ = "0.1.0"
