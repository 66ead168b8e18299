"""Compression choices by name, and 8-bit codecs that work with NumPy 2.

hivemind 1.1.12 reads the codebook length of every 8-bit message with
`int(np.frombuffer(buffer, count=1))`; NumPy 2.4 refuses to turn a 1-element array into an
int, so the receiving peer drops every part compressed with Uniform8Bit, Quantile8Bit or
Blockwise8Bit. The averaging round still "succeeds" (the log says "Averaged gradients with 2
peers"), each peer keeps its own numbers, and only a WARN "received 50.0% of input tensors"
gives it away. `install_numpy2_codecs()` registers codecs that read the header correctly in
hivemind's deserializer table; it runs before any averager process starts (they fork and
inherit the table).
"""

from typing import Literal

import numpy as np
import torch

CompressionName = Literal["none", "fp16", "uint8", "size-adaptive"]
COMPRESSION_NAMES: tuple[str, ...] = ("none", "fp16", "uint8", "size-adaptive")

# tensors below this many elements go in fp16, larger ones in 8 bits (the CALM/RuLeanALBERT rule:
# quantisation error matters for biases and norms, bandwidth for matrices)
SIZE_ADAPTIVE_THRESHOLD = 2**16


def _read_int64(buffer: bytes, offset: int = 0) -> int:
    return int(np.frombuffer(buffer, offset=offset, count=1, dtype=np.int64)[0])


def _codec_classes():
    """Subclasses of hivemind's 8-bit codecs whose `extract` works with NumPy 2 (built lazily)."""
    from hivemind.compression import quantization as q

    class Uniform8Bit(q.Uniform8BitQuantization):
        """Uniform 8-bit quantisation (mean +- 6 sigma in 256 bins) that NumPy 2 can decode."""

        def quantize(self, tensor: torch.Tensor, allow_inplace: bool = False):
            # the same bins as hivemind's, without torch.quantize_per_tensor (deprecated in torch 2.13)
            tensor = tensor.detach().to(dtype=torch.float32, copy=True)
            centered = tensor - tensor.mean()
            std = centered.norm() / max(centered.numel() - 1, 1) ** 0.5
            scale = float(self.RANGE_IN_SIGMAS * std / self.n_bins) or 1.0
            offset = self.n_bins // 2
            quantized = torch.clamp(torch.round(centered / scale) + offset, 0, self.n_bins - 1).to(torch.uint8)
            lookup = q.average_buckets(tensor, quantized, self.n_bins)
            return quantized.numpy(), lookup.numpy().astype(self.codebook_dtype)

        def extract(self, serialized_tensor):
            return _extract_codebook_message(self, serialized_tensor)

    class Quantile8Bit(q.Quantile8BitQuantization):
        """Quantile 8-bit quantisation that NumPy 2 can decode."""

        def extract(self, serialized_tensor):
            return _extract_codebook_message(self, serialized_tensor)

    class Blockwise8Bit(q.BlockwiseQuantization):
        """bitsandbytes blockwise 8-bit quantisation that NumPy 2 can decode."""

        def extract(self, serialized_tensor):
            from bitsandbytes.functional import dequantize_blockwise

            buffer = serialized_tensor.buffer
            absmax_size, codebook_size = _read_int64(buffer), _read_int64(buffer, 8)
            absmax = np.frombuffer(buffer, offset=16, count=absmax_size, dtype=self.codebook_dtype)
            codebook = np.frombuffer(buffer, offset=16 + absmax.nbytes, count=codebook_size,
                                     dtype=self.codebook_dtype)
            quantized = np.frombuffer(buffer, offset=16 + absmax.nbytes + codebook.nbytes, dtype=self.indices_dtype)
            result = dequantize_blockwise(
                torch.as_tensor(quantized).reshape(tuple(serialized_tensor.size)), absmax=torch.as_tensor(absmax),
                code=torch.as_tensor(codebook), blocksize=q._BLOCKWISE_QUANTIZATION_BLOCKSIZE, nested=False)
            return result.to(getattr(torch, serialized_tensor.dtype)).requires_grad_(serialized_tensor.requires_grad)

    return {"UNIFORM_8BIT": Uniform8Bit, "QUANTILE_8BIT": Quantile8Bit, "BLOCKWISE_8BIT": Blockwise8Bit}


def _extract_codebook_message(codec, serialized_tensor) -> torch.Tensor:
    """Decode `int64 codebook length | codebook | uint8 indices`, the layout of hivemind's 8-bit codecs."""
    buffer = serialized_tensor.buffer
    codebook_size = _read_int64(buffer)
    codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=codec.codebook_dtype)
    indices = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=codec.indices_dtype)
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
    codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
    return codebook[indices].requires_grad_(serialized_tensor.requires_grad)


def install_numpy2_codecs() -> None:
    """Make hivemind decode 8-bit messages with our codecs (idempotent, this process and its forks)."""
    from hivemind.compression import serialization

    table = serialization._BASE_COMPRESSION_TYPES
    for key, cls in _codec_classes().items():
        if type(table[key]).__name__ != cls.__name__:
            table[key] = cls()


def build_compression(name: str, option: str):
    """The hivemind compression called `name` (one of COMPRESSION_NAMES) for strategy option `option`."""
    from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression

    from convmodel.errors import UserError

    install_numpy2_codecs()
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    uint8 = _codec_classes()["UNIFORM_8BIT"]()
    if name == "uint8":
        return uint8
    if name == "size-adaptive":
        return SizeAdaptiveCompression(SIZE_ADAPTIVE_THRESHOLD, less=Float16Compression(), greater_equal=uint8)
    raise UserError(f"trainer.strategy.init_args.{option}: unknown compression {name!r}; "
                    f"choose one of {', '.join(COMPRESSION_NAMES)}")
