"""Which convolution a fused graph runs on the CPU: the one routing function ``conv`` (Winograd
where it applies, else the module's convolution with its input and output laid out by map size),
and ``rewrite_convs``, which puts it into a traced graph. ``fastsynth.fuse`` calls
``rewrite_convs`` when it builds the graph of a model that lives on the CPU; a graph built for
another device never reaches this module."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..fuse import ConvBNFold
from .layout import conv_input_layout, conv_output_layout, has_hooks
from .winograd import frozen_conv3x3, is_winograd_shape

__all__ = ["conv", "rewrite_convs"]


def conv(x: torch.Tensor, module: nn.Module, min_hw: int, relu: bool = False) -> torch.Tensor:
    """One convolution of a fused graph (an ``nn.Conv2d`` without hooks, or a ``ConvBNFold``):
    by Winograd F(2x2, 3x3) when it applies (``fastsynth.cpu.winograd``: CPU float32, frozen 3x3
    stride-1 weights, enough channels; its output is channels_last), else the module's own
    convolution with its input in ``conv_input_layout`` and its output in ``conv_output_layout``
    (``min_hw`` 0: layouts untouched; PyTorch converts the weight to the input's layout inside
    the call). Tensors on another device run the plain convolution. ``relu`` (ConvBNFold only) applies a ReLU in place on the output
    (the convolution's backward needs its input and weight, not its output)."""
    if isinstance(module, ConvBNFold):
        if not torch.compiler.is_compiling():
            module.refresh()
        y = frozen_conv3x3(x, module.conv, module.weight, module.bias, module)
        if y is None:
            y = conv_output_layout(module.conv._conv_forward(conv_input_layout(x, min_hw), module.weight,
                                                             module.bias), min_hw)
        return torch.relu_(y) if relu else y
    y = None if has_hooks(module) else frozen_conv3x3(x, module, module.weight, module.bias, module)
    if y is None:  # called as a module: hooks registered on it fire
        y = conv_output_layout(module(conv_input_layout(x, min_hw)), min_hw)
    return y


def rewrite_convs(graph: fx.Graph, module_of: dict, min_hw: int) -> tuple[int, int]:
    """Route every Conv2d / ConvBNFold call of ``graph`` through ``conv`` (Winograd where it
    applies, input/output layouts by map size otherwise). With layouts off (``min_hw`` 0) only
    the convolutions the Winograd path can serve are routed (the others run as traced). A Conv2d
    with hooks (or extra arguments) keeps its call and gets the layouts around it. Returns
    (convolutions given layouts, convolutions routed through ``conv``)."""
    n = routed = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(module_of.get(node.target), (nn.Conv2d, ConvBNFold)):
            continue
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mod = module_of[node.target]
        plain = type(mod) is ConvBNFold or (
            type(mod) is nn.Conv2d and not (mod._forward_hooks or mod._forward_pre_hooks))
        extra_args = len(node.args) != 1 or any(k != "relu" for k in node.kwargs)
        geometry = mod.conv if type(mod) is ConvBNFold else mod
        if plain and not extra_args and (min_hw > 0 or is_winograd_shape(geometry)):
            with graph.inserting_before(node):
                attr = graph.get_attr(node.target)
                call = graph.call_function(conv, (node.args[0], attr, int(min_hw)),
                                           {"relu": True} if node.kwargs.get("relu") else {})
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            n += min_hw > 0
            routed += 1
            continue
        if min_hw <= 0:
            continue
        with graph.inserting_before(node):
            lay = graph.call_function(conv_input_layout, (node.args[0], int(min_hw)))
        node.args = (lay,) + tuple(node.args[1:])
        with graph.inserting_after(node):
            out = graph.call_function(conv_output_layout, (node, int(min_hw)))
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
        n += 1
    return n, routed
