"""The quantization library: formats (pure functions), quantizer modules, recipes, calibration.

``formats`` knows numbers, ``quantizers`` wraps them in nn.Modules with straight-through
gradients, ``recipe`` decides which Linear gets which format, ``calibrate`` fills the static
ranges from data.  Export reads ``QuantLinear.quantized_weight()``: the same codes and scales
the fake-quant forward used.
"""
