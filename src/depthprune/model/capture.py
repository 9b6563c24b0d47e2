"""Seeing what a model's decoder layers are called with: the one layer-capture mechanism.

The analysis (every layer's input, as it streams by), the loss-based criteria (every layer's arguments, to
call the layers again on their own) and layer streaming (the arguments of weightless stand-ins) all watch a
real forward pass of the backbone through :func:`watch_layers`. It hooks every decoder layer before it runs
(forward pre-hooks with keyword arguments) and hands over the layer's hidden-state input and a
:class:`LayerCall` with everything else it got: attention masks, rotary position embeddings, position ids,
whatever the architecture passes. Replaying a ``LayerCall`` on another hidden state calls the layer exactly
as its backbone did, so no architecture-specific code is needed.

Import this module only where torch is already needed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn


def accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s forward takes an argument called ``name`` (e.g. 'position_ids')."""
    return name in inspect.signature(module.forward).parameters


def cache_argument(module: nn.Module) -> str:
    """The name of ``module``'s KV-cache argument (and output): transformers renamed ``past_key_values`` to
    ``cache`` in 5.2x; both are met."""
    return "cache" if accepts(module, "cache") else "past_key_values"


def layer_output(output) -> torch.Tensor:
    """The hidden state a decoder layer returns (some return a tuple with it first)."""
    return output[0] if isinstance(output, tuple) else output


class LayerCall(NamedTuple):
    """How a decoder layer was called, apart from its hidden-state input."""

    args: tuple  # positional arguments after the hidden state
    kwargs: dict  # keyword arguments, without hidden_states
    by_keyword: bool  # the hidden state came as ``hidden_states=``

    def replay(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Call ``layer`` on ``hidden`` with the arguments of this call; returns the hidden state it outputs."""
        if self.by_keyword:
            return layer_output(layer(*self.args, hidden_states=hidden, **self.kwargs))
        return layer_output(layer(hidden, *self.args, **self.kwargs))


def split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    """A layer call's hidden-state input, and the rest of the call."""
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs), False)
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return kwargs["hidden_states"], LayerCall((), rest, True)


class StopForward(Exception):
    """Raised by a hook once it has seen what it needs: the rest of the forward pass is not computed. Whoever
    runs the forward catches it (:func:`watch_layers` does; so does the repair's calibration pass)."""


InputWatcher = Callable[[int, torch.Tensor, LayerCall], None]
OutputWatcher = Callable[[torch.Tensor], None]


@contextmanager
def watch_layers(layers: Sequence[nn.Module], on_input: InputWatcher, on_last_output: OutputWatcher | None = None,
                 *, stop_after_last: bool = False) -> Iterator[None]:
    """Within the block, ``on_input(index, hidden, call)`` sees every call of ``layers[index]`` before it runs,
    and ``on_last_output(hidden)`` the hidden state the last of ``layers`` returns.

    ``stop_after_last`` ends the forward pass once the last layer has run (the final norm, LM head, ... are
    then never computed); the block then carries on after the forward call as if it had returned.
    """
    def pre_hook(index: int):
        def hook(module, args, kwargs):
            on_input(index, *split_call(args, kwargs))

        return hook

    def last_hook(module, args, kwargs, output):
        if on_last_output is not None:
            on_last_output(layer_output(output))
        if stop_after_last:
            raise StopForward

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        yield
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
