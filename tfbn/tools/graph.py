"""A Keras graph model as a flat list of calls, nested models inlined, run piece by piece.

Sequential and functional models record every layer call as a node of a graph. `flatten(model)`
lists those calls in an order that respects the graph, with the calls inside nested Sequential
and functional models in place of the nested model's one call, so that any intermediate tensor
(a batch-norm layer's input inside a nested block, say) can be computed, kept and fed on. Tensors
are named by integer keys; `run(steps, values)` executes some of the calls on concrete tensors.

The graph is read through Keras's node records (`_nodes_by_depth`, `Node.arguments`), the same
structure `keras.Model.call` runs through.
"""

from __future__ import annotations

from typing import NamedTuple

import keras

__all__ = ["Graph", "Step", "check_input_shapes", "flatten", "run"]


class Step(NamedTuple):
    """One layer call: `layer(*args, **kwargs)` with the arguments of its recorded node."""

    layer: object  # the Keras layer (or operation) called
    node: object  # its Keras Node: the argument structure, filled from tensor keys
    arguments: tuple[tuple[int, int], ...]  # (id of the node's argument tensor, its key)
    outputs: tuple[int, ...]  # keys of the outputs, in the node's output order
    path: str  # "outer/inner/name" for a layer inside nested models

    @property
    def inputs(self) -> tuple[int, ...]:
        return tuple(key for _, key in self.arguments)


class Graph(NamedTuple):
    inputs: tuple[int, ...]  # keys of the model's inputs, in `model.inputs` order
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]  # keys of the model's outputs
    tensors: dict[int, object]  # key -> the symbolic tensor (shape with the batch axis, dtype)


def _function(model):
    """The functional graph of a Sequential or functional model, or None (subclassed)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    try:
        return model if model.inputs else None
    except (AttributeError, ValueError):
        return None


def _ordered_nodes(function) -> list:
    """The call nodes of a functional graph, inputs first (Keras's own execution order)."""
    nodes = []
    for depth in sorted(function._nodes_by_depth, reverse=True):
        nodes.extend(n for n in function._nodes_by_depth[depth] if n.operation and not n.is_input)
    return nodes


def _inline(function, keys: dict[int, int], steps: list, tensors: dict, prefix: str) -> None:
    """Appends the steps of `function`, whose input tensors already have keys in `keys`."""
    for node in _ordered_nodes(function):
        layer = node.operation
        nested = None if not isinstance(layer, keras.Model) else _function(layer)
        arguments = tuple((id(t), keys[id(t)]) for t in node.arguments.keras_tensors)
        if nested is not None and len(node.arguments.keras_tensors) == len(nested.inputs):
            inner = dict(keys)
            for tensor, (_, key) in zip(nested.inputs, arguments, strict=True):
                inner[id(tensor)] = key
            _inline(nested, inner, steps, tensors, f"{prefix}{layer.name}/")
            for outer, inner_tensor in zip(node.outputs, nested.outputs, strict=True):
                keys[id(outer)] = inner[id(inner_tensor)]
            keys.update({k: v for k, v in inner.items() if k not in keys})
            continue
        outputs = []
        for tensor in node.outputs:
            keys[id(tensor)] = id(tensor)
            tensors[id(tensor)] = tensor
            outputs.append(id(tensor))
        steps.append(Step(layer, node, arguments, tuple(outputs), prefix + layer.name))


def flatten(model) -> Graph:
    """The calls of a Sequential or functional `model`, nested graph models inlined.

    Raises:
        ValueError: if `model` is not a graph of layers (a subclassed model).
    """
    function = _function(model)
    if function is None:
        raise ValueError(
            f"Model '{model.name}' ({type(model).__name__}) is not a Sequential or functional "
            "model built on its inputs: its layer graph cannot be read."
        )
    keys = {id(t): id(t) for t in function.inputs}
    tensors = {id(t): t for t in function.inputs}
    steps: list[Step] = []
    _inline(function, keys, steps, tensors, "")
    outputs = tuple(keys[id(t)] for t in function.outputs)
    return Graph(tuple(id(t) for t in function.inputs), tuple(steps), outputs, tensors)


def _call(step: Step, args, kwargs):
    return step.layer(*args, **kwargs)


def run(steps, values: dict[int, object], training: bool = False, call=_call) -> dict:
    """Runs `steps` in order on the tensors in `values` (key -> tensor), adding their outputs.

    Each layer is called as the model's own `call` would call it, with `training` passed to the
    layers whose call takes it; `call(step, args, kwargs)` makes the call (it may replace a layer).
    Returns `values`.
    """
    for step in steps:
        local = {argument: values[key] for argument, key in step.arguments}
        args, kwargs = step.node.arguments.fill_in(local)
        if "training" in getattr(step.layer, "_call_context_args", ()):
            kwargs = {**kwargs, "training": training}
        outputs = keras.tree.flatten(call(step, args, kwargs))
        for key, value in zip(step.outputs, outputs, strict=True):
            values[key] = value
    return values


def check_input_shapes(model: keras.Model, flat: Graph, shapes) -> None:
    """Checks that inputs of `shapes` fit the model's inputs (where both sizes are known).

    Raises:
        ValueError: naming both shapes, if the number of inputs, a rank or a size differs.
    """
    expected = [tuple(flat.tensors[key].shape) for key in flat.inputs]

    def fits(shape, want) -> bool:
        return len(shape) == len(want) and all(
            a is None or b is None or a == b for a, b in zip(shape[1:], want[1:], strict=True)
        )

    if len(shapes) != len(expected) or not all(map(fits, shapes, expected)):

        def show(found):
            return found[0] if len(found) == 1 else found

        raise ValueError(
            f"Argument `data`: its batches hold inputs of shape {show(shapes)}, but model "
            f"'{model.name}' takes inputs of shape {show(expected)}."
        )
