"""The documented public names in one place (re-exported; each lives in its room).

    from segcli.api import Segmenter, PredictOptions, predict, resolve_model, TrainOptions, start_training
"""

from segcli.datasets.segmentation import open_dataset
from segcli.embeddings.format import EmbeddingInfo, PixelEmbeddings
from segcli.embeddings.format import load as load_embeddings
from segcli.evaluation.evaluate import evaluate
from segcli.inference.device import resolve_device, resolve_precision
from segcli.inference.segmenter import Prediction, Segmenter
from segcli.inference.settings import InferenceSettings
from segcli.modeling import build_model
from segcli.models.checkpoint import load_checkpoint, save_checkpoint
from segcli.models.export import export_model
from segcli.models.factory import describe_model, load_model, resolve_model
from segcli.pipeline.launch import predict
from segcli.pipeline.options import PredictOptions
from segcli.training.options import TrainOptions
from segcli.training.trainer import resume_training, start_training
from segcli.vocabulary.labels import LabelSet, parse_labels

__all__ = ["EmbeddingInfo", "InferenceSettings", "LabelSet", "PixelEmbeddings", "PredictOptions", "Prediction", "Segmenter",
           "TrainOptions", "build_model", "describe_model", "evaluate", "export_model", "load_checkpoint", "load_embeddings",
           "load_model", "open_dataset", "parse_labels", "predict", "resolve_device", "resolve_model", "resolve_precision",
           "resume_training", "save_checkpoint", "start_training"]
