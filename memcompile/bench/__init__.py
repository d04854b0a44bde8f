"""``python -m memcompile.bench``: memtrain against the setups users would pick instead.

Modes:

* ``train``: peak memory, saved activations and throughput of one fine-tuning step per setup, each
  setup in its own process (``memcompile.bench.train``);
* ``converge``: loss curves of each setup on the bundled text, as CSV and PNG (``memcompile.bench.converge``);
* ``kernels``: each Triton kernel of ``memcompile.kernels`` against the same op in torch and
  bitsandbytes (``memcompile.bench.kernels``).

Setups are data: one ``Setup`` entry each in ``memcompile.bench.setups.SETUPS``.
"""
