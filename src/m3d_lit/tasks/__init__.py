"""LightningModules, one per training stage."""

from m3d_lit.tasks.align import AlignTask
from m3d_lit.tasks.base import BaseTask
from m3d_lit.tasks.clip import ClipTask
from m3d_lit.tasks.finetune import FinetuneTask

__all__ = ["AlignTask", "BaseTask", "ClipTask", "FinetuneTask"]
