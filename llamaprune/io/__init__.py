"""Reading and writing models and text: model sources and loading, safetensors, the layer stream, the pruned
checkpoint format, text data."""
