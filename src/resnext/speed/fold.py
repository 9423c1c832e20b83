"""Batch-norm folding: each BN that directly follows a convolution becomes that convolution's bias.

The graph is read with torch.fx (to know which BN consumes which convolution's output and nothing
else); the change is made in the module tree itself, so the folded model keeps its class and
methods (``forward_features``, ``spec`` ...). A pre-activation BN (one that precedes its
convolution) is left in place: it cannot be folded into the following convolution through a ReLU.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import fx, nn


def fold_conv_bn_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution equal to ``bn(conv(x))`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn}: a BN without running statistics cannot be folded")
    # float64 so that folding adds no rounding beyond the final cast.
    w = conv.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (bias - mean) * scale + beta
    return new_w.to(conv.weight.dtype), new_b.to(conv.weight.dtype)


def module_call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times the traced graph calls each submodule (by its qualified name)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def trace_or_none(tracer: type[fx.Tracer], module: nn.Module) -> fx.Graph | None:
    """`module`'s graph traced with `tracer`, or None where fx cannot trace it."""
    try:
        return tracer().trace(module)
    except Exception:  # fx raises many kinds of errors on untraceable code
        return None


def traced_parents(
    model: nn.Module, parents: Iterable[str], tracer: type[fx.Tracer]
) -> Iterator[tuple[str, fx.Graph, dict[str, nn.Module], dict[str, int]]]:
    """Each of the named submodules traced with `tracer`, in the order given: its name, graph,
    own submodules by name and `module_call_counts`; those fx cannot trace are skipped."""
    for name in parents:
        parent = model.get_submodule(name)
        graph = trace_or_none(tracer, parent)
        if graph is not None:
            yield name, graph, dict(parent.named_modules()), module_call_counts(graph)


def parents_of(model: nn.Module, matches: Callable[[nn.Module], object]) -> set[str]:
    """The names of the modules with a child that `matches`, less the root: a pass rewrites a
    chain by replacing its parent module, so the root itself is never one."""
    return {name.rpartition(".")[0] for name, m in model.named_modules() if matches(m)} - {""}


def child_calls(
    model: nn.Module, matches: Callable[[nn.Module], object], tracer: type[fx.Tracer]
) -> Iterator[tuple[str, fx.Node, dict[str, nn.Module], dict[str, int]]]:
    """Each call of a child that `matches` in the graphs of `parents_of` (traced with `tracer`,
    in name order): the parent's name, the call's node, the parent's modules by name and their
    call counts."""
    for parent_name, graph, modules, calls in traced_parents(
        model, sorted(parents_of(model, matches)), tracer
    ):
        for node in graph.nodes:
            if node.op == "call_module" and matches(modules.get(str(node.target))):
                yield parent_name, node, modules, calls


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for every BN whose only input is a convolution used by nothing else."""
    graph = fx.Tracer().trace(model)
    calls = module_call_counts(graph)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv = modules[src.target]
        # Both modules must be called exactly once, the conv's output feeding only this BN.
        foldable = (
            isinstance(conv, nn.Conv2d)
            and conv.padding_mode == "zeros"
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
            and len(node.args) == 1
            and not node.kwargs
        )
        if foldable:
            pairs.append((src.target, node.target))
    return pairs


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name` inside `root`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def replace_nodes(graph: fx.Graph, nodes: list[fx.Node], child: str, args: tuple) -> None:
    """Put one call of submodule `child` on `args` in place of `nodes`: nodes in graph order,
    each used only by the next, the last one's users then reading the call."""
    last = nodes[-1]
    with graph.inserting_before(last):
        call = graph.call_module(child, args)
    last.replace_all_uses_with(call)
    for dead in reversed(nodes):  # the last first: then each is used by nothing left
        graph.erase_node(dead)


def graph_module(parent: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """`graph` as a module in place of `parent`, with the annotations traced from a string
    (`from __future__ import annotations`) dropped: fx's code would hold them as globals that
    are not importable names, and pickling the module (`torch.save`) would fail on them."""
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    return fx.GraphModule(parent, graph, parent.__class__.__name__)


def install_graph(
    model: nn.Module, parent_name: str, graph: fx.Graph, child: str, module: nn.Module
) -> None:
    """Replace the submodule `parent_name` of `model` by its rewritten `graph`, with `module` at
    `child` (the call the rewrite put in) and the submodules the graph no longer calls dropped."""
    parent = model.get_submodule(parent_name)
    rewritten = graph_module(parent, graph)
    set_module(rewritten, child, module)
    rewritten.delete_all_unused_submodules()
    set_module(model, parent_name, rewritten)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """An eval-mode model (a copy unless `inplace`) with every conv→BN pair folded into the conv.

    If the model cannot be traced by torch.fx, it is returned unfolded (eval mode) with a warning.
    """
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    try:
        pairs = find_conv_bn_pairs(target)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        warnings.warn(
            f"BN folding skipped: the model cannot be traced by torch.fx ({exc})",
            RuntimeWarning,
            stacklevel=2,
        )
        return target
    for conv_name, bn_name in pairs:
        conv = target.get_submodule(conv_name)
        bn = target.get_submodule(bn_name)
        weight, bias = fold_conv_bn_weights(conv, bn)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        set_module(target, bn_name, nn.Identity())
    return target


def count_batchnorms(model: nn.Module) -> int:
    """How many BatchNorm layers the model still contains."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
