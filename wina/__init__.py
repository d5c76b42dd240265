"""wina: training-free activation sparsity (WINA, TEAL) for transformers causal LMs.

``import wina`` is cheap (no torch); the public API lives in :mod:`wina.api`::

    from wina import api
    loaded = api.load("smollm2-135m")               # model + tokenizer (embedded default)
    opts = api.SparseOptions(method="wina", sparsity=0.5, transform=True)
    sp = api.apply(loaded, opts)                    # the transform (optional, same outputs), the gates
    ppl, measured = api.perplexity(loaded, opts, "wiki.test.raw")
    print(sp.report())                              # nominal / measured sparsity, FLOPs
    sp.remove()
"""
__version__ = "0.1.0"
