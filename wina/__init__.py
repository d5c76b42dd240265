"""wina: training-free activation sparsity (WINA, TEAL) for transformers causal LMs.

``import wina`` is cheap (no torch); the public API lives in :mod:`wina.api`::

    from wina.api import load, transform, sparsify, perplexity
    loaded = load("smollm2-135m")                   # model + tokenizer (embedded default)
    transform(loaded.model)                         # optional: column-orthogonal weights, same outputs
    sp = sparsify(loaded.model, "wina", 0.5)        # gates on every projection's input
    print(perplexity(loaded.model, loaded.tokenizer, text).perplexity)
    print(sp.report())                              # nominal / measured sparsity, FLOPs
    sp.remove()
"""
__version__ = "0.1.0"
