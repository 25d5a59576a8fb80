"""Parts used by two or more methods, with no method's name in their code.

- :mod:`.prompts`: prompt ensembles and their mean text embeddings (WinCLIP's states and templates);
- :mod:`.prompt_learning`: CoOp-style learnable prompts with deep text prompts;
- :mod:`.scoring`: two-class cosine probabilities, patch probability maps, fusion means, default sizes;
- :mod:`.losses`: focal, dice and image cross-entropy;
- :mod:`.smoothing`: Gaussian smoothing of anomaly maps on the device.

Import the module you need (``from clipad.components.smoothing import gaussian_blur``).
"""
