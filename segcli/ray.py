"""segcli on Ray Data, for people who already have a Ray Dataset (`pip install 'segcli[ray]'`).

    import ray, segcli.ray
    ds = ray.data.read_images("s3://bucket/photos", mode="RGB")          # a column "image": HxWx3 uint8
    ds = ds.map_batches(segcli.ray.Segment, fn_constructor_kwargs={"model": "clip-dense", "labels": "road,car,sky"},
                        batch_size=8, compute=ray.data.ActorPoolStrategy(size=2), num_gpus=1)
    ds.take(1)[0]["label_map"]                                           # HxW, index k is labels[k]

`Segment` is the Python API's Segmenter.predict as a `map_batches` class: the same label maps as
`segcli predict` gives for those images with the same model and options. `segcli predict --engine ray`
runs the whole predict pipeline (decoding and writing in CPU tasks, the model in an actor pool, the
same outputs, records and summary as a local run) with the stages in segcli.pipeline.ray_engine.
"""

from __future__ import annotations

from segcli.pipeline.ray_engine import Model, RayEngine, decode_row, finish_row, start_ray

__all__ = ["Segment", "Model", "RayEngine", "decode_row", "finish_row", "start_ray"]


class Segment:
    """A batch with an `image_column` of HxWx3 uint8 images -> the same batch with `output_column`
    holding each image's label map (HxW uint8, or uint16 past 256 labels) at the image's size."""

    def __init__(self, model: str = "clip-dense", labels: str | None = None, device: str = "auto",
                 precision: str = "auto", prompt: str | None = None, image_column: str = "image",
                 output_column: str = "label_map", batch_size: int = 8):
        from segcli.inference.segmenter import Segmenter

        self.seg = Segmenter.from_pretrained(model, device=device, precision=precision, warn=False)
        self.labels = self.seg.resolve_labels(labels)
        self.prompt, self.image_column, self.output_column, self.batch_size = prompt, image_column, output_column, batch_size

    def __call__(self, batch: dict) -> dict:
        images = list(batch[self.image_column])
        predictions = self.seg.predict(images, labels=self.labels, prompt=self.prompt, batch_size=self.batch_size)
        return {**batch, self.output_column: [p.label_map for p in predictions]}
