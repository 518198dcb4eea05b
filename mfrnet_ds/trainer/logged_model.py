"""The trained model as an MLflow logged model (`mlflow.pytorch`), with a signature and an input example.

    model = mlflow.pytorch.load_model("models:/<model_id>")      # or runs:/<run_id>/model
    embedding = model(images, camids)    # images (B, 3, 3, H, W) float32, normalised as the shards'
                                         # evaluation loader does; camids (B,) int64 -> (B, D) float32

The loading process needs `mfrnet_ds` importable (the pickled module refers to its classes) and nothing
else: no DeepSpeed launcher, no checkpoint folder, no network. The embeddings are those of
`launch/evaluate.py --save-embeddings` for the same images (evaluation mode, fp32).
"""
from __future__ import annotations

import torch
from torch import nn

from mfrnet_ds.config import MODALITIES
from mfrnet_ds.tracking.model import log_pytorch_model

EXAMPLE_SAMPLES = 2


class Embedder(nn.Module):
    """MFRNet reduced to what retrieval needs: (images, camids) -> embedding, in evaluation mode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor, camids: torch.Tensor) -> torch.Tensor:
        # images: (B, 3 modalities, C, H, W); camids: (B,)
        return self.model(images, camids.long()).embedding.float()


def signature_and_example(embedder: Embedder, shards, img_size):
    """(ModelSignature, input example, embedding size) from real query samples of the run's shards."""
    from mlflow.models import infer_signature

    from mfrnet_ds.viz_samples import take_samples

    batch = take_samples(shards, "query", EXAMPLE_SAMPLES, img_size)
    example = {"images": batch["images"].float().numpy(), "camids": batch["camids"].long().numpy()}
    with torch.no_grad():
        output = embedder(batch["images"].float(), batch["camids"].long()).numpy()
    return infer_signature(example, output), example, int(output.shape[1])


def log_trained_model(tracking_uri: str, run_id: str, loaded, shards, registered_name: str = ""):
    """Log `loaded` = (config, model) of `mfrnet_ds.export.load_exported` as the run's `model`
    (mlflow.pytorch); returns the ModelInfo."""
    import deepspeed

    config, model = loaded
    embedder = Embedder(model)
    signature, example, dim = signature_and_example(embedder, shards, config.model.img_size)
    num_params = sum(p.numel() for p in model.parameters())
    return log_pytorch_model(
        tracking_uri, run_id, embedder, signature, example, registered_name,
        # listed, not inferred: inference would import the model in a subprocess (slow, and the
        # training venv's full freeze is not what an inference host needs)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"deepspeed=={deepspeed.__version__}", "timm"],
        params={"num_params": str(num_params), "preset": config.model.preset},
        metadata={"embedding_dim": dim, "img_size": list(config.model.img_size), "modalities": list(MODALITIES)})
