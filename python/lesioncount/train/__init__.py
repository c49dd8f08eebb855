"""UNet training utilities: the 3D UNet, training data (synthetic phantoms, real-anatomy phantoms,
nnU-Net raw folders) and the training loop.

This package is deliberately light at import time: ``import lesioncount.train`` pulls in nothing
but the standard library. Import the submodules you need::

    from lesioncount.train.model import UNet3D
    from lesioncount.train.data import PhantomDataset, build_datasets

Submodules:

- :mod:`lesioncount.train.model`: :class:`~lesioncount.train.model.UNet3D` (5 levels, 32..512 filters).
- :mod:`lesioncount.train.phantom`: seeded multi-sequence (T1, T1c, T2, FLAIR, PD) MS-like phantoms
  with enhancing lesions (the counted target) and non-enhancing distractors.
- :mod:`lesioncount.train.anatomy`: the same lesion model on real anatomy (nilearn's MNI152 templates,
  or Debian's mricron-data Colin27 brain when installed).
- :mod:`lesioncount.train.data`: ``torch.utils.data.Dataset`` wrappers, nnU-Net raw-folder reader,
  augmentation (:class:`~lesioncount.train.data.RandomAffineFlip`) and ``build_datasets``.
"""

__all__ = ["model", "phantom", "anatomy", "data"]
