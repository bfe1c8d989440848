"""1-bit Adam's error-compensated compressed all-reduce ("1-bit Adam: Communication Efficient
Large-Scale Training with Adam's Convergence Speed", Tang et al., 2021, Algorithm 2)."""

from __future__ import annotations

from lightning_converge.comm.sign import SignCompressor


class OneBitCompressor(SignCompressor):
    """Average over the ranks with two scaled-sign compressions, each with its own error feedback.

    The flat buffer is cut into one chunk per rank (whole blocks), and every rank
    serves one chunk (:class:`~lightning_converge.comm.chunked.ChunkedCompressor`):

    1. worker: compress ``values + worker_error`` to signs and block scales
       (:class:`~lightning_converge.comm.sign.SignCompressor`); the worker error keeps
       what was lost. An all-to-all sends chunk ``j`` to rank ``j``.
    2. server: rank ``j`` averages the chunks it received, compresses
       ``average + server_error`` the same way and keeps its own server error.
       An all-gather hands every rank every compressed chunk; all ranks decode the
       same bytes, so they hold the same average.

    Each rank sends ``(1 + 1 / world_size) * numel / 8`` bytes of signs and receives
    ``2 * numel / 8`` (plus the block scales) however many ranks there are.

    This is the ``sign`` compressor's exchange, taken in two phases at every number of
    ranks (``sign`` all-gathers below three, where that is as cheap and exact);
    :class:`~lightning_converge.strategies.OneBitAdamStrategy` uses it for its momenta.
    """

    name = "onebit"
    two_phase_from = 1
    point_to_point = False  # its two-phase all-reduce is what it adds to ``sign``, which goes point to point
