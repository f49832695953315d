"""Weight-only quantization of the decoder graph (the vision graph stays float32).

`int8` / `int4`: ONNX Runtime `MatMulNBits` (ORT `MatMulNBitsQuantizer`): every MatMul with a
constant weight (fused QKV, o_proj, fused gate/up, down_proj, lm_head) stores 8- or 4-bit
symmetric blocks of 32 along the input dimension with one float scale per block and column;
`accuracy_level` 4 lets the CPU kernel quantize activations to int8 per block and run integer
dot products. One node per MatMul (dynamic quantization adds DynamicQuantizeLinear /
MatMulInteger / Cast / Mul chains per MatMul). The graph interface stays float32.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from finers_rt.export.graph_files import consolidate_external_data

QUANTIZATIONS = ("none", "int8", "int4")
BLOCK_SIZE = 32
INT4_BLOCK_SIZE = BLOCK_SIZE
ACCURACY_LEVEL = 4  # int8 activations in the CPU kernel (0 = unset is much slower for 8 bits)
_BITS = {"int8": 8, "int4": 4}


def quantize_decoder(path: Path, precision: str) -> None:
    """Quantize `path` (decoder.onnx) in place to `precision` ('int8' or 'int4')."""
    path = Path(path)
    tmp = path.with_name(path.stem + f".{precision}.onnx")
    if precision in _BITS:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(path), load_external_data=True)
        quantizer = MatMulNBitsQuantizer(model, bits=_BITS[precision], block_size=BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
        quantizer.process()
        onnx.save_model(quantizer.model.model, str(tmp),
                        save_as_external_data=_has_data(path), all_tensors_to_one_file=True,
                        location=tmp.name + ".data")
    else:
        raise ValueError(f"unknown precision '{precision}', expected int8 or int4")
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    path.unlink()
    tmp_data = tmp.with_name(tmp.name + ".data")
    if tmp_data.exists():
        # re-point the external data at decoder.onnx.data
        model = onnx.load(str(tmp), load_external_data=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)
        tmp.unlink()
        tmp_data.unlink()
    else:
        tmp.rename(path)
    consolidate_external_data(path)


def _has_data(path: Path) -> bool:
    return path.with_name(path.name + ".data").exists()
