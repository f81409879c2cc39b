"""The DeepSeek-V4 model in PyTorch: config, quantisation formats, layers in forward order, cache, generation."""
