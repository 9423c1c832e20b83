"""Fusing a producer → (identities) → consumer chain of our kernel modules into one call.

The passes that put two kernel calls into one (`dot_grouped`: a first 1×1 into the grouped 3×3
after it; `dot_block`: that pair into the last 1×1 after it) share this: find each chain in the
traced parents of the model, time it both ways on its real input shape, and where the fused
module wins rewrite the parent's graph to one call of it on the producer's input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from resnext.speed.fold import child_calls, install_graph, replace_nodes
from resnext.speed.grouped_swap import LayerChoice, check_mode, input_shapes, time_on_random
from resnext.speed.kernel_module import KernelLeafTracer
from resnext.speed.pointwise_fusion import single_input
from resnext.speed.timing_cache import TimingCache, cached, layer_key

Way = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class Chain:
    """What one pass fuses: the consumer and producer module types, whether a pair is fusable
    (producer, consumer), whether the consumer's second argument must be the producer's input (a
    residual), and which of the two names the fused module takes."""

    producer: type[nn.Module]
    consumer: type[nn.Module]
    fusable: Callable[[nn.Module, nn.Module], bool]
    residual: bool
    at_producer: bool


@dataclass(frozen=True)
class Site:
    """One chain inside a traced parent module (child names within the parent)."""

    parent: str
    producer: str
    consumer: str


def _chain(node: fx.Node, modules: dict[str, nn.Module], kind: Chain) -> list[fx.Node] | None:
    """From the consumer call's first argument back to a producer call on one input:
    [identities..., producer], each used only by the next; None if it is anything else (or,
    with `kind.residual`, if the consumer's second argument is not the producer's input)."""
    want = 2 if kind.residual else 1
    if len(node.args) != want or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    chain = []
    src = node.args[0]
    while isinstance(src, fx.Node) and len(src.users) == 1 and src.op == "call_module":
        chain.append(src)
        module = modules.get(str(src.target))
        if isinstance(module, kind.producer):
            source = single_input(src)
            ok = source is not None and (not kind.residual or source is node.args[1])
            return chain if ok else None
        if not isinstance(module, nn.Identity):
            return None
        src = single_input(src)
    return None


def find_sites(model: nn.Module, kind: Chain) -> list[Site]:
    """Every fusable chain whose two modules are each called once by their parent."""
    sites = []
    consumers = child_calls(model, lambda m: isinstance(m, kind.consumer), KernelLeafTracer)
    for parent_name, node, modules, calls in consumers:
        chain = _chain(node, modules, kind)
        if chain is None:
            continue
        producer, consumer = str(chain[-1].target), str(node.target)
        once = calls[producer] == 1 and calls[consumer] == 1
        if once and kind.fusable(modules[producer], modules[consumer]):
            sites.append(Site(parent_name, producer, consumer))
    return sites


def fuse(model: nn.Module, site: Site, fused: nn.Module, kind: Chain) -> None:
    """Rewrite the parent's graph: one call of `fused` on the producer's input in place of the
    consumer and its chain."""
    parent = model.get_submodule(site.parent)
    graph = KernelLeafTracer().trace(parent)
    modules = dict(parent.named_modules())
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == site.consumer)
    chain = _chain(node, modules, kind)
    assert chain is not None and chain[-1].target == site.producer
    child = site.producer if kind.at_producer else site.consumer
    # `chain` runs from the consumer's input back to the producer: graph order reversed
    replace_nodes(graph, [*reversed(chain), node], child, (chain[-1].args[0],))
    install_graph(model, site.parent, graph, child, fused)


def run_pass(
    model: nn.Module,
    example: torch.Tensor,
    kind: Chain,
    ways: Callable[[nn.Module, nn.Module], tuple[Way, nn.Module, Way]],
    *,
    switch: str,
    mode: str,
    variant: str,
    repeats: int,
    timings: TimingCache | None,
) -> list[LayerChoice]:
    """Each chain of bf16 `example`'s model timed both ways (in turns, on a random input of the
    producer's real input shape) and fused where that is faster ('on': always; 'off': never).
    `ways(producer, consumer)` gives the separate way, the fused module and the fused way.
    Choices are named after the consumer (native_ms: apart, kernel_ms: fused). With `timings`,
    times stored there are used instead of measured."""
    check_mode(switch, mode)
    if mode == "off" or example.dtype != torch.bfloat16:
        return []
    sites = find_sites(model, kind)
    if not sites:
        return []
    names = [f"{s.parent}.{s.producer}" for s in sites]
    shapes = input_shapes(model, names, example)
    choices = []
    for site, name in zip(sites, names, strict=True):
        if name not in shapes:
            continue
        producer = model.get_submodule(name)
        consumer = model.get_submodule(f"{site.parent}.{site.consumer}")
        separate, fused, fused_way = ways(producer, consumer)
        measure = functools.partial(
            time_on_random, [separate, fused_way], shapes[name], torch.bfloat16, repeats
        )
        key = layer_key(variant, shapes[name], torch.bfloat16, producer, consumer)
        separate_ms, fused_ms = cached(timings, key, 2, measure)
        use = mode == "on" or fused_ms < separate_ms
        if use:
            fuse(model, site, fused, kind)
        choices.append(
            LayerChoice(
                f"{site.parent}.{site.consumer}",
                tuple(shapes[name]),
                separate_ms,
                fused_ms,
                "fused" if use else "separate",
                variant,
            )
        )
    return choices
