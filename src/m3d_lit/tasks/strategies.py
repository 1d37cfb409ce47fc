"""Strategy presets for the hardware the project targets, and the sharded checkpoints of the `fsdp` one.

- `PCIeDDPStrategy`: DDP for GPUs without peer-to-peer (RTX 4090 boxes).
- `ZeroStrategy`: DeepSpeed ZeRO-2 (CUDA only), its folders written atomically with a plain
  `m3d_lit.ckpt` inside that every reader takes.
- `ShardedStrategy`: Lightning's `ModelParallelStrategy` with FSDP2 (`fully_shard` per decoder layer
  and ViT block, the rest as one root unit), hybrid across machines: each machine holds one sharded copy,
  the machines replicate it. Its checkpoints are folders (one shard file per rank, written under a
  temporary name and renamed when complete) that leave out the frozen LLM like every m3d-lit checkpoint;
  `inference.checkpoints.read_checkpoint` reads one back in a single process (eval, ask, export, the
  next stage).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
from torch import nn

from m3d_lit.atomic import torch_save as atomic_torch_save
from m3d_lit.errors import InputError
from m3d_lit.inference.checkpoints import CONSOLIDATED, is_sharded_checkpoint
from m3d_lit.models.llm import unwrap

__all__ = [
    "PCIeDDPStrategy",
    "ShardedStrategy",
    "ZeroStrategy",
    "rebuild_train_loader_after_restore",
    "save_folder_atomically",
    "shard_model",
    "whole_weights",
    "write_consolidated",
]


class PCIeDDPStrategy(DDPStrategy):
    """DDP for boxes whose GPUs talk over PCIe without peer-to-peer (RTX 4090).

    The 4090 has no P2P support, and NCCL hangs in its first all-reduce unless told so with
    `NCCL_P2P_DISABLE=1` (NVIDIA/nccl-tests#117, Lightning#19425). The variable is set in every process
    before the process group starts, so no launch script has to remember it.

    Args:
        nccl_p2p_disable: set `NCCL_P2P_DISABLE=1` (a value already in the environment wins).
        find_unused_parameters: DDP's search for unused parameters; not needed, the model gives every
            trainable parameter a gradient each step.
        gradient_as_bucket_view: let gradients share DDP's buckets (saves one gradient copy).
    """

    strategy_name = "ddp_pcie"

    def __init__(
        self,
        nccl_p2p_disable: bool = True,
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = True,
    ) -> None:
        super().__init__(
            find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=gradient_as_bucket_view
        )
        self.nccl_p2p_disable = nccl_p2p_disable

    def setup_environment(self) -> None:
        if self.nccl_p2p_disable:
            os.environ.setdefault("NCCL_P2P_DISABLE", "1")
        super().setup_environment()


def sharded_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one: the LLM's decoder layers, the ViT's and BERT's blocks.

    The segmentation module stays in the root unit: on a step without a mask row its weights are touched
    with weight 0 from the root's forward, which a unit of its own would not have gathered.
    """
    blocks: list[nn.Module] = []
    llm = getattr(model, "llm", None)
    if isinstance(llm, nn.Module):
        blocks += list(unwrap(llm).get_decoder().layers)
    vision = getattr(model, "vision", None)
    if isinstance(vision, nn.Module):
        blocks += list(vision.blocks)
    text = getattr(model, "text", None)
    encoder = getattr(text, "encoder", None)
    if isinstance(encoder, nn.Module):
        blocks += list(encoder.layer)
    return blocks


def shard_model(model: nn.Module, mesh: Any, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply FSDP2 to `model` in place (once): every `sharded_blocks` unit, then the root.

    Args:
        model: the built model, its weights loaded (frozen ones in their training dtype).
        mesh: a 2-D device mesh (replicate, shard): hybrid sharding; (1, world) is plain FSDP.
        param_dtype: the dtype the units compute in (bf16 under a bf16 precision: trainable fp32 weights
            are cast for the compute, gradients reduced in fp32); None: as they are held.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    for block in sharded_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def whole_weights(model: nn.Module) -> Iterator[None]:
    """Inside, an FSDP2-sharded model's root weights are whole (gathered from every rank), as generation
    needs outside the root's forward; every rank must enter. A model that is not sharded: as it is."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 through Lightning's `ModelParallelStrategy`, for GPUs (and CPU ranks with gloo in tests).

    The task shards its model in `configure_model` (`shard_model`): on N machines of G devices the mesh is
    (N, G) with `hybrid`, so each machine keeps one copy sharded G ways and only gradients cross machines;
    without it one copy is sharded over all N x G ranks. Every rank reads its own samples (the mesh's
    shape does not split the data). Checkpoints are sharded folders written atomically, leaving out the
    frozen LLM (rebuilt from `llm_path` on load, as for every m3d-lit checkpoint).

    Args:
        hybrid: shard within a machine, replicate across machines (HSDP); False shards over all ranks.
        process_group_backend: `nccl` on GPUs (default), `gloo` on CPUs.
    """

    strategy_name = "m3d_fsdp"
    requires_several_processes = True

    def __init__(self, hybrid: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend)
        self.hybrid = hybrid

    def setup_environment(self) -> None:
        if self.hybrid:
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes, self.num_processes
        else:
            self._data_parallel_size, self._tensor_parallel_size = 1, self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        save_folder_atomically(
            self, filepath, lambda folder: ModelParallelStrategy.save_checkpoint(self, checkpoint, folder)
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Restore a sharded folder; the frozen weights it leaves out keep the values built from
        `llm_path` (the task checks they are the same model, `restore_frozen_base`)."""
        from torch.distributed.checkpoint import DefaultLoadPlanner, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        rebuild_train_loader_after_restore(self)
        # partial: the frozen LLM is not in the folder (checked below), and an optimizer without state
        # (plain SGD) saved none of the entries a fresh one lists
        planner = DefaultLoadPlanner(allow_partial_load=True)
        state = get_model_state_dict(self.model)
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=True)
        omitted = set((metadata.get("m3d_lit") or {}).get("omitted") or [])
        missing = sorted(set(state) - _saved_keys(path, "state_dict") - omitted)
        if missing:
            raise InputError(path, f"lacks {len(missing)} weights of this model, e.g. {missing[:2]}")
        load({"state_dict": state}, checkpoint_id=path, planner=planner)
        self.model.load_state_dict(state, strict=False)
        for index, optimizer in enumerate(self.optimizers):
            optimizer_state = {f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path, planner=planner)
            options = StateDictOptions(cpu_offload=True)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=optimizer_state[f"optimizer_{index}"], options=options
            )
        return metadata


class ZeroStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO (stage 2 by default: optimizer state and gradients sharded) for CUDA GPUs.

    Its checkpoints are DeepSpeed folders (`--ckpt_path` resumes from them) written under a temporary name
    and renamed when complete, without the frozen weights (`exclude_frozen_parameters`: rebuilt from
    `llm_path` on load, checked against the record), plus `m3d_lit.ckpt` beside DeepSpeed's files: the
    trainable weights as the forward uses them and the run's record, a plain checkpoint file that eval,
    ask, export and the next stage's `init_from` read (no conversion step, no pickled DeepSpeed objects).

    Args:
        stage: the ZeRO stage (2: optimizer state and gradients; 3 would shard the weights too, whose
            `m3d_lit.ckpt` would then hold only this rank's view: not supported here).
        **kwargs: Lightning's `DeepSpeedStrategy` arguments.
    """

    strategy_name = "m3d_zero"

    def __init__(self, stage: int = 2, **kwargs: Any) -> None:
        if stage not in (1, 2):
            raise InputError(
                "--trainer.strategy.init_args.stage", f"{stage}: ZeroStrategy takes stage 1 or 2"
            )
        super().__init__(stage=stage, exclude_frozen_parameters=True, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        def write(folder: Path) -> None:
            if self.is_global_zero:
                write_consolidated(checkpoint, folder)
            DeepSpeedStrategy.save_checkpoint(self, checkpoint, folder, storage_options)

        save_folder_atomically(self, filepath, write)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # the frozen weights were left out of DeepSpeed's module states (the task checks and restores them)
        module = self.lightning_module
        strict, module.strict_loading = module.strict_loading, False
        rebuild_train_loader_after_restore(self)
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module.strict_loading = strict


def rebuild_train_loader_after_restore(strategy: Any) -> None:
    """Have the fit loop build its training loader again once the checkpoint is restored.

    These strategies restore a checkpoint after their setup, and with `max_epochs` set Lightning builds
    the training loader (and its iterator) in that setup, to count the steps of the learning-rate
    schedule: the loader's restored position would come too late for it, and the resumed epoch would
    start from its first batch. Built again after the restore, the loader starts where the checkpoint
    says (`BaseDataModule` keeps the position in its own state).
    """
    trainer = strategy.lightning_module.trainer
    if trainer.state.fn == "fit":
        trainer.fit_loop._combined_loader = None


def save_folder_atomically(strategy: Any, filepath: Any, write: Any) -> None:
    """Have every rank `write(folder)` into one temporary folder beside `filepath`, then put it in place
    on rank 0, so a kill during the write leaves the previous checkpoint whole."""
    path = Path(strategy.broadcast(str(filepath)))
    temporary = Path(strategy.broadcast(str(path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"))))
    write(temporary)
    strategy.barrier("m3d_checkpoint_written")
    if strategy.global_rank == 0:
        previous = path.with_name(f".{path.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        if path.is_dir():
            os.replace(path, previous)
        elif path.exists():
            path.unlink()
        os.replace(temporary, path)
        shutil.rmtree(previous, ignore_errors=True)
    strategy.barrier("m3d_checkpoint_renamed")


def write_consolidated(checkpoint: dict[str, Any], folder: Path) -> Path:
    """`folder/m3d_lit.ckpt`: the checkpoint without its optimizer state, a plain Lightning file."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in checkpoint.items() if k != "optimizer_states"}
    path = folder / CONSOLIDATED
    atomic_torch_save(kept, path)
    return path


def _saved_keys(path: Path, group: str) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    prefix = f"{group}."
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key[len(prefix) :] for key in keys if key.startswith(prefix)}
