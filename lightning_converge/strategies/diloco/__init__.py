"""DiLoCo and Streaming DiLoCo: data-parallel training that communicates every H steps, not every step.

* :class:`DiLoCoStrategy` ("DiLoCo: Distributed Low-Communication Training of
  Language Models", Douillard et al., 2023), registered as ``strategy="diloco"``.
  Each worker runs the user's optimizer (the *inner* optimizer, from
  ``configure_optimizers``) alone for ``inner_steps`` steps, with no gradient
  all-reduce. Then the workers average their *pseudo-gradients* (global
  parameters minus local parameters) in one all-reduce, an *outer* optimizer
  (SGD with Nesterov momentum, lr 0.7, momentum 0.9 in the paper) applies the
  average to the global parameters, and every worker continues from the new
  global parameters. ``inner_steps`` may be a schedule, such as
  :class:`~lightning_converge.schedules.QSR` (Quadratic Synchronization Rule),
  which is given the inner optimizer's live learning rate.
  ``delay=1`` overlaps the all-reduce with the next inner phase: the average
  is applied one outer step late, the "delayed outer gradients" of "Eager
  Updates For Overlapped Communication and Computation in DiLoCo" (Kale et al.,
  2025).
* :class:`StreamingDiLoCoStrategy` ("Streaming DiLoCo with overlapping
  communication", Douillard et al., 2025), registered as
  ``strategy="streaming_diloco"``: the parameters are split into
  ``num_fragments`` fragments (whole layers, strided, by default; or equal runs
  of the parameters, ``fragment_assignment="balanced"``) that synchronize in
  turn, so the peak bandwidth falls by ``num_fragments``; each fragment's all-reduce starts
  ``overlap_steps`` inner steps before it is applied, and the new global value
  is mixed into the local one with ``mixing_alpha``.

Both are one engine: DiLoCo is Streaming DiLoCo with one fragment, no overlap
and no mixing (plus, with ``delay=1``, an overlap of a whole outer step).

The package, one concern per module; all but the two strategies know nothing
of Lightning, so other local-SGD strategies can build on them:

* :mod:`.fragments`: which parameters synchronize together
  (:func:`assign_fragments`, :func:`split_evenly`, ``Fragment``);
* :mod:`.schedule`: the rounds of inner steps and when each fragment syncs;
* :mod:`.outer`: the global parameters, pseudo-gradients and the outer
  optimizer (``OuterState``), and the checks of the outer options;
* :mod:`.exchange`: averaging pseudo-gradients over the workers (its own
  process group, a thread for blocking compressors), the syncs in flight and
  the byte and wait counters;
* :mod:`.state`: what a checkpoint holds (``checkpoint["diloco"]`` and each
  worker's own state);
* :mod:`.engine`: ``DiLoCoEngine``, the engine mixed into the synchronous
  strategies (the inner-step hook, a sync, an outer update, the end of ``fit``,
  evaluation with the global parameters, the checkpoint state);
* :mod:`.strategy`: :class:`DiLoCoStrategy`, the engine over ``DDPStrategy``;
* :mod:`.sharded`: :class:`ShardedDiLoCoStrategy` (``strategy="diloco_fsdp"``),
  the engine over ``ModelParallelStrategy``: replicas each sharded by FSDP2 on
  a replicas x shards mesh, the outer step on each rank's shards, and
  :class:`ShardedStreamingDiLoCoStrategy` (``strategy="streaming_diloco_fsdp"``);
* :mod:`.streaming`: :class:`StreamingDiLoCoStrategy`, the engine's streaming
  options;
* :mod:`.dynamic`: dynamic local updates for :class:`DiLoCoStrategy`
  (``dynamic_inner_steps=True``): each worker's inner steps a round from the
  speeds gathered at the last sync, and the clock that measures its speed;
* :mod:`.async_outer`, :mod:`.async_protocol`, :mod:`.asynchronous`:
  :class:`AsyncDiLoCoStrategy` (``strategy="async_diloco"``, "Asynchronous Local-SGD
  Training for Language Modeling", Liu et al., 2024): the server's outer rules
  (Delayed Nesterov, dynamic local updates, staleness penalty), the messages
  between workers and server, and the strategy.

Importing this package registers the five strategies with Lightning's ``StrategyRegistry``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_converge.strategies.diloco.async_outer import dynamic_inner_steps
from lightning_converge.strategies.diloco.async_protocol import AsyncDiLoCoError
from lightning_converge.strategies.diloco.asynchronous import AsyncDiLoCoStrategy
from lightning_converge.strategies.diloco.fragments import Piece, assign_fragments, split_evenly
from lightning_converge.strategies.diloco.outer import OuterOptimizerFactory
from lightning_converge.strategies.diloco.sharded import ShardedDiLoCoStrategy, ShardedStreamingDiLoCoStrategy
from lightning_converge.strategies.diloco.strategy import DiLoCoStrategy
from lightning_converge.strategies.diloco.streaming import StreamingDiLoCoStrategy

__all__ = [
    "AsyncDiLoCoError",
    "AsyncDiLoCoStrategy",
    "DiLoCoStrategy",
    "OuterOptimizerFactory",
    "Piece",
    "ShardedDiLoCoStrategy",
    "ShardedStreamingDiLoCoStrategy",
    "StreamingDiLoCoStrategy",
    "assign_fragments",
    "dynamic_inner_steps",
    "split_evenly",
]

DiLoCoStrategy.register_strategies(StrategyRegistry)
StreamingDiLoCoStrategy.register_strategies(StrategyRegistry)
AsyncDiLoCoStrategy.register_strategies(StrategyRegistry)
ShardedDiLoCoStrategy.register_strategies(StrategyRegistry)
ShardedStreamingDiLoCoStrategy.register_strategies(StrategyRegistry)
