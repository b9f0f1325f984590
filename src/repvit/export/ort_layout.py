"""An ONNX graph pass that lets ONNX Runtime's CPU blocked layout (NCHWc) cover the squeeze-excite blocks.

ORT's CPU provider runs convolutions in a blocked channel layout (NCHWc, 8 or 16 channels per block) and converts
to plain NCHW (``ReorderOutput``) before any node it cannot run blocked, and back (``ReorderInput``) after. In a
RepViT (or any SE network) exported as is, three nodes per SE block fall out of the blocked layout:

* the squeeze, ``ReduceMean(axes=[2, 3], keepdims=1)`` (ORT blocks ``GlobalAveragePool`` only), and
* the excite, ``Mul(x, gate)`` with a ``(N, C, 1, 1)`` gate: the blocked ``Mul`` needs inputs of one shape, so
  the broadcast keeps it in NCHW, and with it the residual ``Add`` that follows.

For RepViT-M0.9 that is 61 full-map reorders per image (10 SE blocks). The pass rewrites the squeeze as
``GlobalAveragePool`` and gives the excite a gate of the map's size through ``Resize`` (nearest, integer scales:
ORT runs it blocked as ``Upsample``), so the whole network stays blocked: one reorder in, none left inside.
The function is unchanged (nearest upsampling of a 1x1 map copies the value; the pooling is the same mean).

It costs one extra write of each gated map, which other runtimes may not win back, so it is an option of the
ONNX export (``ort_nchwc=True``, ``repvit export --ort-nchwc``), not the default graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["nchwc_friendly_se"]


def _const_ints(name: str, inits: dict[str, Any], consts: dict[str, Any]) -> list[int] | None:
    from onnx import numpy_helper

    if name in inits:
        return [int(v) for v in numpy_helper.to_array(inits[name]).reshape(-1)]
    if name in consts:
        for a in consts[name].attribute:
            if a.name == "value":
                return [int(v) for v in numpy_helper.to_array(a.t).reshape(-1)]
    return None


def _is_spatial_mean(node: Any, rank: int | None, inits: dict, consts: dict) -> bool:
    """``ReduceMean`` over H and W of a 4-D tensor, keeping the dims (axes as attribute before opset 18, as input
    since)."""
    if node.op_type != "ReduceMean" or rank != 4:
        return False
    attrs = {a.name: a for a in node.attribute}
    if "keepdims" in attrs and attrs["keepdims"].i == 0:
        return False
    if "axes" in attrs:
        axes = list(attrs["axes"].ints)
    elif len(node.input) > 1 and node.input[1]:
        axes = _const_ints(node.input[1], inits, consts)
    else:
        return False        # no axes: a mean over all dims
    return axes is not None and sorted(a % 4 for a in axes) == [2, 3]


def nchwc_friendly_se(model: Any) -> tuple[Any, dict[str, int]]:
    """Rewrite ``model`` (an ``onnx.ModelProto``, changed in place and returned) as described in the module
    docstring. Returns it with the counts ``{"pools": ..., "gates": ...}`` of rewritten nodes; a graph without
    the pattern comes back unchanged (counts 0). Needs static H and W (the batch may be symbolic)."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    g = model.graph
    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    nodes, pools, gates, dropped = [], 0, 0, set()
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    for node in g.node:
        shape_in = shapes.get(node.input[0]) if node.input else None
        if _is_spatial_mean(node, len(shape_in) if shape_in else None, inits, consts):
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                          name=f"{node.name or 'ReduceMean'}_as_gap"))
            dropped.update(node.input[1:])      # its axes
            pools += 1
            continue
        if node.op_type == "Mul" and len(node.input) == 2:
            for k in (1, 0):                    # which input is the (N, C, 1, 1) gate
                gate, full = shapes.get(node.input[k]), shapes.get(node.input[1 - k])
                if (gate is None or full is None or len(gate) != 4 or len(full) != 4 or gate[2:] != [1, 1]
                        or None in full[1:] or gate[1] != full[1] or full[2] * full[3] == 1):
                    continue
                scales, out = f"{node.input[k]}_nchwc_scales", f"{node.input[k]}_nchwc_full"
                while scales in taken or out in taken:
                    scales, out = scales + "_", out + "_"
                taken |= {scales, out}
                g.initializer.append(numpy_helper.from_array(np.array([1, 1, full[2], full[3]], np.float32), scales))
                nodes.append(helper.make_node(
                    "Resize", [node.input[k], "", scales], [out], name=f"{node.name or 'Mul'}_gate_resize",
                    mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
                node.input[k] = out
                gates += 1
                break
        nodes.append(node)
    # the replaced ReduceMeans' axes constants, unless something else reads them
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    gone = dropped - used
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in gone)]
    kept_inits = [t for t in g.initializer if t.name not in gone]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    onnx.checker.check_model(model)
    return model, {"pools": pools, "gates": gates}
