"""Shared settings of the brcd tests: a tiny digits run that trains in seconds."""

TINY = {
    "bits": 16, "device": "cpu", "threads": 1,
    "data.n_train": 192, "data.n_query": 64, "data.n_val": 48,
    "teacher.model.head": "mlp", "teacher.model.hidden": 64,
    "teacher.train.batch_size": 32, "teacher.train.steps_per_epoch": 6, "teacher.train.lr": 3e-3,
    "student.train.batch_size": 32, "student.train.steps_per_epoch": 6, "student.train.lr": 3e-3,
    "teacher.train.epochs": 1, "student.train.epochs": 1, "masks.n_clusters": 4,
    "masks.n_init": 3,
}
