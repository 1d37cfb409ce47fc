"""The special tokens M3D-LaMed adds to its LLM's vocabulary.

`<im_patch>` marks where the image tokens enter the sequence, `<bx_start>` and `<bx_end>` enclose a 3D
box (`m3d_lit.boxes`), `[SEG]` asks for a mask. Only names here: the tokenizers that hold them are built
in `m3d_lit.models.tokenizer`.
"""

__all__ = ["BX_END", "BX_START", "IM_PATCH", "LAMED_TOKENS", "SEG"]

IM_PATCH, BX_START, BX_END, SEG = "<im_patch>", "<bx_start>", "<bx_end>", "[SEG]"
LAMED_TOKENS = (IM_PATCH, BX_START, BX_END, SEG)
