"""Options every strategy of the pack takes or refuses the same way.

Each strategy lists its own options and :class:`~lightning.pytorch.strategies.DDPStrategy`'s
in its signature (so LightningCLI shows them), and takes the options of the
``DistributedDataParallel`` wrapper in one dict, ``ddp_kwargs``. Its ``**kwargs``
exist only to turn a mistake into a clear error at construction: :func:`reject_options`.
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any, Optional, Union

from torch.nn.parallel import DistributedDataParallel

from lightning_converge.options import unknown_options_error

# The options of the DistributedDataParallel wrapper, with their defaults.
DDP_WRAPPER_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(DistributedDataParallel).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
# DDPStrategy's options for its own gradient hooks: our strategies register theirs, or have no gradient all-reduce.
DDP_HOOK_OPTIONS = frozenset({"ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period"})


def init_argument_names(cls: type) -> list[str]:
    """The named constructor arguments of ``cls``: those of the first ``__init__`` along the MRO that names
    any (a subclass whose ``__init__`` only passes ``*args, **kwargs`` on has its parent's)."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            parameters = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]
            names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if names:
                return sorted(names)
    return []


def reject_options(owner: type, options: dict[str, Any], *, wraps_model: bool = True) -> None:
    """Raise a ``TypeError`` for the keyword ``options`` that ``owner``'s ``**kwargs`` caught.

    A ``DistributedDataParallel`` option is told to go in ``ddp_kwargs``, or, for a strategy that does not
    wrap the model (``wraps_model=False``), that it has no meaning there; anything else is unknown, with the
    closest valid name.
    """
    name = owner.__name__
    wrapper = {key: value for key, value in options.items() if key in DDP_WRAPPER_DEFAULTS}
    if not wraps_model:
        wrapper.update({key: value for key, value in options.items() if key in DDP_HOOK_OPTIONS})
        check_unwrapped(owner, wrapper)
    if wrapper:
        listed = ", ".join(map(repr, sorted(wrapper)))
        verb = "is an option" if len(wrapper) == 1 else "are options"
        raise TypeError(f"{name}: {listed} {verb} of the DistributedDataParallel wrapper; pass ddp_kwargs={wrapper!r}")
    if options:
        raise unknown_options_error(name, options, init_argument_names(owner))


def check_unwrapped(owner: type, ddp_kwargs: Optional[dict[str, Any]]) -> None:
    """For a strategy that does not wrap the model: raise unless every wrapper option keeps its default."""
    meaningful = sorted(
        key for key, value in (ddp_kwargs or {}).items()
        if key not in DDP_WRAPPER_DEFAULTS or value != DDP_WRAPPER_DEFAULTS[key]
    )
    if meaningful:
        raise TypeError(
            f"{owner.__name__} does not wrap the model in DistributedDataParallel, so these "
            f"DistributedDataParallel options have no meaning here: {meaningful}"
        )


def as_timedelta(timeout: Union[float, timedelta, None]) -> Optional[timedelta]:
    """``timeout`` as DDPStrategy takes it: seconds (a number) become a ``timedelta``."""
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        return timedelta(seconds=timeout)
    return timeout
