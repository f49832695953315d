"""Weight-only quantization of the decoder graph (the vision graph stays float32).

`int8`: ORT `quantize_dynamic` on MatMul weights (QInt8, per-tensor); `int4`: ORT
`MatMulNBitsQuantizer`, 4-bit blocks of 32, symmetric, accuracy_level 4. The graph interface
stays float32.

Measured (ORT 1.32, 1 thread, this repo's shared-KV decoders): 8-bit `MatMulNBits` (blocks of 32,
accuracy_level 4) decodes about as fast as dynamic int8 on finers-tiny (0.47 vs 0.43 ms/step) but
prefills 1.7x slower (99 vs 59 ms for 340 tokens), and on the 0.5B-shaped decoder it is slower in
both (decode 55 vs 40 ms/token, prefill 700 vs 230 ms for 100 tokens): int8 stays dynamic.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from finers_rt.export.graph_files import consolidate_external_data

QUANTIZATIONS = ("none", "int8", "int4")
INT4_BLOCK_SIZE = 32
# int8 activations inside MatMulNBits: finers-tiny decode step 0.62 -> 0.41 ms, 340-token prefill
# 31 -> 40 ms (ORT 1.32, 1 thread); decode dominates for every stage and larger models
INT4_ACCURACY_LEVEL = 4


def quantize_decoder(path: Path, precision: str) -> None:
    """Quantize `path` (decoder.onnx) in place to `precision` ('int8' or 'int4')."""
    path = Path(path)
    tmp = path.with_name(path.stem + f".{precision}.onnx")
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], per_channel=False,
                         use_external_data_format=_has_data(path))
    elif precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(path), load_external_data=True)
        quantizer = MatMulNBitsQuantizer(model, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=INT4_ACCURACY_LEVEL)
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
