"""The ``triton`` backend of the kernels: one module per pass (update rules, EMA, Grokfast, DiLoCo's
outer step, 1-bit Adam's update, the int8 and sign compressors).

Importing any module below imports triton, so nothing imports them eagerly: each
rule in ``kernels/`` registers its implementation with
:meth:`~lightning_converge.kernels.dispatch.Kernel.register_triton` through a
loader that runs on first use. Users without triton can import everything else.

Every implementation has its reference's signature and mutates the same tensors.
Each launches one program grid per group of tensors (see :func:`.common.launch_over_tensors`)
and reads the changing hyperparameters from their 0-d tensors inside the kernel,
so a schedule never causes a host sync or a recompile.
"""
