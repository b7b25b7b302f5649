"""``qmamba.ray``: score a ``ray.data.Dataset`` you already hold (the engine behind ``qmamba score --engine ray``).

    import ray
    import qmamba.ray

    images = ray.data.read_parquet("s3://bucket/images.parquet")
    qmamba.ray.score_dataset(images, "best.ckpt", column="url").write_parquet("s3://bucket/scores/")

See :mod:`qmamba.inference.ray_data`; needs ``pip install "qmamba[ray]"``.
"""

from qmamba.inference.ray_data import RayScorer, score_dataset

__all__ = ["RayScorer", "score_dataset"]
