"""The documented public names in one place (re-exported; each lives in its room).

    from segcli.api import Segmenter, resolve_model, save_checkpoint, TrainOptions, start_training
"""

from segcli.data.labels import LabelSet, parse_labels
from segcli.data.segmentation import open_dataset
from segcli.embeddings.format import EmbeddingInfo, PixelEmbeddings
from segcli.embeddings.format import load as load_embeddings
from segcli.inference.device import resolve_device, resolve_precision
from segcli.inference.segmenter import Prediction, Segmenter
from segcli.modeling import build_model
from segcli.models.checkpoint import load_checkpoint, save_checkpoint
from segcli.models.export import export_model
from segcli.models.factory import describe_model, load_model, resolve_model
from segcli.training.evaluate import evaluate
from segcli.training.options import TrainOptions
from segcli.training.trainer import resume_training, start_training

__all__ = ["EmbeddingInfo", "LabelSet", "PixelEmbeddings", "Prediction", "Segmenter", "TrainOptions", "build_model",
           "describe_model", "evaluate", "export_model", "load_checkpoint", "load_embeddings", "load_model",
           "open_dataset", "parse_labels", "resolve_device", "resolve_model", "resolve_precision", "resume_training",
           "save_checkpoint", "start_training"]
