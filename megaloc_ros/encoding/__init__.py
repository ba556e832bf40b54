"""Stage 1, encoding: camera image -> descriptor.

  preprocess   resize + normalisation of the official evaluation (numpy)
  sidecar.py   the ``.json`` next to an exported model (what the Encoder needs to run it)
  cache.py     where models and caches live
  encoder.py   the runtime ``Encoder`` (ONNX Runtime: TensorRT / CUDA / CPU, or OpenVINO)
  loader.py    ``load_encoder``: which model (MegaLoc when exported, else the offline backbone)
  model/       PyTorch MegaLoc (DINOv2 ViT + SALAD), the offline backbone, checkpoint loading
  export.py    PyTorch -> ONNX / OpenVINO IR, checked against PyTorch
Only model/, export.py and the Encoder's torch backend need PyTorch (``require_torch``).
"""
from megaloc_ros.errors import MegalocError


def require_torch(what: str):
    """The ``torch`` module, or one MegalocError line naming what needs it and how to get it."""
    try:
        import torch
    except ImportError as exc:
        raise MegalocError(f"PyTorch is needed for {what}: pip install 'megaloc_ros[export]' "
                           f"({exc})") from None
    return torch
