"""Loaders for the published M3D models (directories in the official Hugging Face layout).

No remote code runs and nothing is downloaded: configs are read as JSON, weights with safetensors or
`torch.load(weights_only=True)`, and every size is checked against the weight shapes.
"""
