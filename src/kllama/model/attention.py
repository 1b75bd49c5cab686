"""The attention kernels kllama's forwards may pick: torch's SDPA backends other than cuDNN's.

torch builds (on the host) and caches one cuDNN attention graph per exact q/k/v shape and strides, which costs tenths
of a second to seconds each time. kllama's shapes keep changing: a packed training row's slices have new lengths and
strides every step, and every new prompt length or packed step of the inference engine is a new shape. Measured on
the H200 box (benchmarks/NOTES.md):
* training (`benchmarks/packed_pass.py --layers 4 --placements stream`, seventh session): a packed DPO micro-step of
  13,105 real tokens took 4.6 s with cuDNN against 0.32 s with the memory-efficient kernel;
* inference (fourteenth session): after a 32-token warm-up, a chat answer to a 19-token prompt on a tiny model
  waited 0.93 s for its first token, 0.92 s of it in `scaled_dot_product_attention`; the next answer of the same
  length waited 0.007 s. V2-Lite's first answer waited 1.8 s. With this list (fifteenth session, V2-Lite): 0.19 s,
  a second answer of a new length 0.06 s, and the api's 8-stream median time to first token 1.21 -> 0.12 s.

The others build nothing per shape. Flash attention takes no mask and needs equal q/k/v head widths.
Memory-efficient attention takes masks and value heads narrower than the query's, as DeepSeek's MLA has (192 and
128). Math takes anything.
"""
from __future__ import annotations

from torch.nn.attention import SDPBackend

SHAPE_STABLE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
