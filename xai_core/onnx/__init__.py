"""ONNX models, run by onnxruntime: a black-box adapter (model-agnostic methods only)."""
