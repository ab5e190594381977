"""4-bit NormalFloat (NF4) storage of frozen base kernels, as in QLoRA (Dettmers et al. 2023, arXiv:2305.14314).

A frozen kernel `w` of shape (*lead, out) is stored blockwise along its LAST axis and dequantised on the fly
inside the jitted forward pass (`dequantize` is pure jax.numpy with static shapes). Leading axes are kept on
every per-element array, so those arrays can carry the kernel's logical sharding on the leading axes.

Layout of `quantize(w, block_size=B, double_quant=..., scale_block_size=S)` (P = out rounded up to a multiple
of B, zero-padded; `dequantize` slices the padding back off):

* "codes":  uint8 (*lead, P // 2). Two 4-bit indices into `NF4_CODE_BOOK` per byte; as in bitsandbytes the
  even element of each pair sits in the high nibble, the odd element in the low nibble.
* without double quantisation:
  "absmax": float32 (*lead, P // B), the max |w| of each block of B consecutive values along the last axis;
  element = NF4_CODE_BOOK[code] * absmax of its block.
* with double quantisation (QLoRA's quantisation of the quantisation constants), "absmax" is replaced by
  "absmax_offset": float32 (), the mean of all absmax values;
  "absmax_codes":  int8 (*lead, P // B), symmetric linear codes of (absmax - offset);
  "absmax_scale":  float32 (G,), one scale per group of consecutive values of the flattened absmax array;
  absmax = offset + code * scale / 127. With N = number of absmax values, G = ceil(N / S) and every group
  holds ceil(N / G) <= S values (exactly S whenever S divides N, the usual case: a (4096, 4096) kernel has
  N = 4096 * 64). Balancing the groups this way makes the layout self-describing: `dequantize` recovers the
  grouping from the static shapes alone, so it needs no `scale_block_size` argument that could silently
  disagree with the one used to quantise. The stored sizes are the same as for groups of exactly S.

Bytes per parameter with the defaults (B=64, S=256): 0.5 (codes) + 1/64 (int8 absmax) + 4/(64*256) (scales)
~= 0.516, against 4 for float32 and 2 for bfloat16.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from finetune.errors import FinetuneError

# The 16 NF4 values, copied digit for digit from bitsandbytes (`bitsandbytes.functional.create_normal_map`, whose
# output is hard-coded as the NF4 table in its CUDA kernels; the same table is listed in Appendix E of the QLoRA
# paper). They are quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0 and asymmetric halves (8 positive,
# 7 negative values). Written out by hand because no JAX library provides NF4 and bitsandbytes itself is a
# CUDA/torch package; recomputing them with scipy quantiles would differ from bitsandbytes in the last bits.
NF4_CODE_BOOK = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
     1.0],
    dtype=np.float32)

# Decision boundaries for nearest-value rounding: code i is chosen for x in (mid[i-1], mid[i]]. A binary search
# over these 15 midpoints needs no (..., 16) distance tensor, which for a 4096 x 4096 kernel would be 1 GiB.
_MIDPOINTS = ((NF4_CODE_BOOK[:-1] + NF4_CODE_BOOK[1:]) / 2).astype(np.float32)

# Double quantisation: bitsandbytes stores the absmax values with its dynamic (non-linear) 8-bit map. We use
# symmetric linear int8 instead: after subtracting the mean, the absmax values of a group span a narrow range
# of similar magnitudes, where a non-linear map buys nothing. The error is bounded: |absmax - dequantised| <=
# scale / 254 (half an int8 step; scale = max |absmax - offset| in the group), and since every NF4 value is in
# [-1, 1] it moves each weight by at most that much too - under 0.4% of the group's largest |absmax - offset|,
# against the NF4 rounding error of up to 15% of the block's absmax (half the largest code-book gap, 0.304 / 2).
# The offset is one mean over all blocks, so in a layer whose rows differ ~100-fold in scale the small rows' blocks
# lie far from it and lose relatively more (measured: RMS error of those rows 9.2% -> 15.2%), as in bitsandbytes.
_INT8_MAX = 127


def _check_args(block_size: Any, scale_block_size: Any) -> None:
  """Raises FinetuneError for block sizes the layout cannot represent (checked outside jit/eval_shape)."""
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0 \
      or block_size % 2:
    raise FinetuneError(f"NF4 block_size={block_size!r} must be a positive even integer (two 4-bit codes share "
                        "a byte); use e.g. 64, the QLoRA default")
  if isinstance(scale_block_size, bool) or not isinstance(scale_block_size, (int, np.integer)) \
      or scale_block_size <= 0:
    raise FinetuneError(f"NF4 scale_block_size={scale_block_size!r} must be a positive integer; use e.g. 256, "
                        "the QLoRA default")


def _check_kernel(shape: Sequence[int]) -> None:
  if len(shape) < 1 or any(int(d) <= 0 for d in shape):
    raise FinetuneError(f"NF4 quantisation needs a kernel with at least one axis and no empty axis, got shape "
                        f"{tuple(shape)}; keep such arrays unquantised")


def _scale_groups(num_absmax: int, num_groups: int) -> int:
  """Values per double-quantisation group: the balanced split described in the module docstring."""
  return -(-num_absmax // num_groups)


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant", "scale_block_size"))
def _quantize(w: jax.Array, block_size: int, double_quant: bool, scale_block_size: int) -> dict[str, jax.Array]:
  *lead, out = w.shape
  padded = -(-out // block_size) * block_size
  num_blocks = padded // block_size
  w = w.astype(jnp.float32)
  # Zero padding is harmless: zeros never raise a block's absmax and dequantize slices them off.
  w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, padded - out)])
  blocks = w.reshape(*lead, num_blocks, block_size)  # (*lead, P) -> (*lead, P/B, B)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)  # (*lead, P/B)
  # An all-zero block would divide 0 by 0; dividing by 1 instead maps it to code 7 (exactly 0.0).
  safe = jnp.where(absmax == 0, 1.0, absmax)
  normed = blocks / safe[..., None]  # in [-1, 1]
  codes = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed, side="left").astype(jnp.uint8)  # (*lead, P/B, B)
  pairs = codes.reshape(*lead, padded // 2, 2)  # (*lead, P/B, B) -> (*lead, P/2, 2)
  packed = (pairs[..., 0] << 4) | pairs[..., 1]  # (*lead, P/2): even element high nibble, as bitsandbytes
  if not double_quant:
    return {"codes": packed, "absmax": absmax}

  num_absmax = absmax.size
  num_groups = -(-num_absmax // scale_block_size)
  group = _scale_groups(num_absmax, num_groups)
  # Absmax values are all >= 0; centring them uses the sign bit of the int8 codes instead of wasting it.
  offset = jnp.mean(absmax)
  centred = jnp.pad((absmax - offset).reshape(-1), (0, num_groups * group - num_absmax))  # (G * group,)
  centred = centred.reshape(num_groups, group)  # (G * group,) -> (G, group)
  scale = jnp.max(jnp.abs(centred), axis=-1)  # (G,)
  safe_scale = jnp.where(scale == 0, 1.0, scale)
  absmax_codes = jnp.clip(jnp.round(centred / safe_scale[:, None] * _INT8_MAX), -_INT8_MAX, _INT8_MAX)
  absmax_codes = absmax_codes.astype(jnp.int8).reshape(-1)[:num_absmax].reshape(absmax.shape)  # (*lead, P/B)
  return {"codes": packed, "absmax_codes": absmax_codes, "absmax_scale": scale.astype(jnp.float32),
          "absmax_offset": offset.astype(jnp.float32)}


def quantize(w: jax.Array, block_size: int = 64, double_quant: bool = True,
             scale_block_size: int = 256) -> dict[str, jax.Array]:
  """NF4 storage of kernel `w` (*lead, out), blocked along the last axis; layout in the module docstring.

  Jit-compatible (block sizes and `double_quant` are static); `w` is read as float32 whatever its dtype."""
  _check_args(block_size, scale_block_size)
  _check_kernel(w.shape)
  return _quantize(w, int(block_size), bool(double_quant), int(scale_block_size))


def dequantize_absmax(q: dict[str, jax.Array]) -> jax.Array:
  """The float32 per-block absmax (*lead, P/B) of a quantised kernel, undoing double quantisation if present."""
  if "absmax" in q:
    return q["absmax"].astype(jnp.float32)
  codes = q["absmax_codes"]
  scale = q["absmax_scale"]
  num_absmax = math.prod(codes.shape)
  num_groups = scale.shape[0]
  group = _scale_groups(num_absmax, num_groups)
  flat = jnp.pad(codes.reshape(-1).astype(jnp.float32), (0, num_groups * group - num_absmax))  # (G * group,)
  values = flat.reshape(num_groups, group) * (scale.astype(jnp.float32) / _INT8_MAX)[:, None]  # (G, group)
  return values.reshape(-1)[:num_absmax].reshape(codes.shape) + q["absmax_offset"]  # (*lead, P/B)


def dequantize(q: dict[str, jax.Array], shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """The kernel of exactly `shape` stored in `q` (padding sliced off), as `dtype`.

  Works under jax.jit with `q` traced; `shape` and `dtype` must be static."""
  shape = tuple(int(d) for d in shape)
  _check_kernel(shape)
  *lead, out = shape
  packed = q["codes"]
  padded = packed.shape[-1] * 2
  absmax = dequantize_absmax(q)  # (*lead, P/B)
  num_blocks = absmax.shape[-1]
  if tuple(packed.shape[:-1]) != tuple(lead) or tuple(absmax.shape[:-1]) != tuple(lead) or num_blocks == 0 \
      or padded % num_blocks or not padded - padded // num_blocks < out <= padded:
    raise FinetuneError(f"NF4 arrays with codes {tuple(packed.shape)} and absmax {tuple(absmax.shape)} cannot "
                        f"hold a kernel of shape {shape}; pass the shape the kernel had when it was quantised")
  block_size = padded // num_blocks
  pairs = jnp.stack([packed >> 4, packed & 0xF], axis=-1)  # (*lead, P/2) -> (*lead, P/2, 2)
  values = jnp.asarray(NF4_CODE_BOOK)[pairs.reshape(*lead, num_blocks, block_size)]  # (*lead, P/B, B) float32
  w = (values * absmax[..., None]).reshape(*lead, padded)  # (*lead, P/B, B) -> (*lead, P)
  return w[..., :out].astype(dtype)  # (*lead, out)


def abstract_quantized(shape: tuple[int, ...], block_size: int = 64, double_quant: bool = True,
                       scale_block_size: int = 256) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes `quantize` returns for a kernel of `shape`, without allocating anything."""
  _check_args(block_size, scale_block_size)  # Here, not inside eval_shape, so the error carries no jax frames.
  _check_kernel(shape)
  return jax.eval_shape(
      functools.partial(_quantize, block_size=int(block_size), double_quant=bool(double_quant),
                        scale_block_size=int(scale_block_size)),
      jax.ShapeDtypeStruct(tuple(shape), jnp.float32))


def stored_bytes(q: dict[str, Any]) -> int:
  """Bytes held by the arrays of `q` (real arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in q.values()))


def memory_report(shapes: Sequence[tuple[int, ...]], block_size: int = 64, double_quant: bool = True,
                  scale_block_size: int = 256) -> dict[str, int]:
  """{"nf4", "float32", "bfloat16"}: total bytes to store kernels of `shapes` each way (exact NF4 layout)."""
  params = sum(math.prod(s) for s in shapes)
  nf4 = sum(stored_bytes(abstract_quantized(s, block_size, double_quant, scale_block_size)) for s in shapes)
  return {"nf4": int(nf4), "float32": 4 * int(params), "bfloat16": 2 * int(params)}
