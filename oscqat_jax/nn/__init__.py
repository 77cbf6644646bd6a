"""Flax Linen glue over the functional core: quantized layers, quant setups and contexts."""
