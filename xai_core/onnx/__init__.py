"""ONNX models, run by onnxruntime, explained white-box from their graph.

``adapter.py``: the ``OnnxAdapter`` and its protocols; ``graph.py``: the graph read once
(layers, default layer, heads, attention, the tail after captured tensors); ``interpreter.py``:
ONNX operators in torch for gradients; ``gradients.py``: Grad-CAM's and rollout's backward pass
through the tail, checked against onnxruntime's scores.
"""
