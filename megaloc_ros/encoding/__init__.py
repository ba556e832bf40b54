"""Stage 1, encoding: camera image -> descriptor.

  model/       PyTorch MegaLoc (DINOv2 ViT + SALAD), the offline backbone, checkpoint loading
  export.py    PyTorch -> ONNX / OpenVINO IR, checked against PyTorch; the ``.json`` sidecar
  preprocess   resize + normalisation of the official evaluation (numpy; no torch)
  encoder.py   the runtime ``Encoder`` (ONNX Runtime: TensorRT / CUDA / CPU, or OpenVINO)
"""
