"""`LamedModel.compile_blocks` (the tasks' `compile_blocks`): the compiled ViT blocks, decoder layers and
segmentation encoder blocks give the eager loss and gradients.

The backend is `aot_eager_decomp_partition`: dynamo captures each block, AOTAutograd splits forward and
backward with inductor's decompositions and its min-cut partitioner (what inductor would recompute in
backward), and the graphs then run as eager ATen calls, which take 20 s here where inductor's C++ code
generation takes minutes. What inductor adds on top is its own code, not the capture of this model.
"""

from __future__ import annotations

import copy

import torch
from conftest import LAMED
from equality_steps import batch_items, draw_weights, forward_batch

from m3d_lit.data.collate import make_collator
from m3d_lit.models.build import build_lamed
from m3d_lit.models.presets import STAGE_TRAINABLE


def _step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the LoRA dropout draws
    out = forward_batch(model, batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_give_the_eager_loss_and_gradients() -> None:
    model = build_lamed("tiny", LAMED)
    model.set_trainable(STAGE_TRAINABLE[3])
    model.enable_gradient_checkpointing(llm=True)  # as the GPU presets train
    model = model.double().train()
    draw_weights(model)
    compiled = copy.deepcopy(model)
    compiled.compile_blocks(backend="aot_eager_decomp_partition")
    batch = make_collator(model)(batch_items(model)[0])
    loss, grads = _step(model, batch)
    compiled_loss, compiled_grads = _step(compiled, batch)
    # float64: the same operations, summed in places in another order (a few units of 1e-16)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-12, atol=0)
    assert compiled_grads.keys() == grads.keys()
    # some gradients are zero but for rounding (a key bias under softmax, a bias before a batch norm), so
    # the tolerance is absolute, at the scale of the largest gradient
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-12 * scale, msg=name)


def test_the_task_option_compiles_the_blocks_for_fit_only() -> None:
    from lightning.pytorch import Trainer

    from m3d_lit.tasks import FinetuneTask

    task = FinetuneTask(preset="tiny", overrides=LAMED, compile_blocks=True, log_examples=0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    task.trainer = trainer
    trainer.state.fn = "validate"
    task.configure_model()  # as Lightning's validate calls it
    blocks = [task.model.vision.blocks[0], task.model.segmentation.image_encoder.blocks[0]]
    blocks.append(task.model.llm.get_base_model().model.layers[0])
    assert all(block._compiled_call_impl is None for block in blocks)
    trainer.state.fn = "fit"
    task.configure_model()  # as Lightning's fit calls it: now the blocks are compiled
    assert all(block._compiled_call_impl is not None for block in blocks)
