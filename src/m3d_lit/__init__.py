"""m3d-lit: M3D-LaMed on PyTorch Lightning."""

__version__ = "0.1.0"
