"""Strategy presets for the hardware the project targets."""

from __future__ import annotations

import os

from lightning.pytorch.strategies import DDPStrategy

__all__ = ["PCIeDDPStrategy"]


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
