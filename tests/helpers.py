"""Input makers shared by the tests and the benchmarks."""
from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# mergekit's examples/ties.yml with the models and the base as format fields {m0} {m1} {m2}
# {base} (tests/test_cli.py, tests/test_config.py)
TIES_YML = """\
models:
  - model: {m0}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {m1}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {m2}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def make_finetunes(shape, n, dtypes=("bf16",), base_dtype=None, scale=0.01, seed=0,
                   device="cpu", second_moments=False):
    """A base tensor and n fine-tunes of it (base + small noise), rounded to the given dtypes,
    so bf16 rounding creates many equal magnitudes (threshold ties) as in real checkpoints."""
    g = torch.Generator().manual_seed(seed)
    base32 = torch.randn(shape, generator=g)
    base = base32.to(base_dtype or DTYPES[dtypes[0]])
    models = []
    for i in range(n):
        dt = DTYPES[dtypes[i % len(dtypes)]]
        delta = scale * torch.randn(shape, generator=g)
        # a shared component makes the models agree in sign often, as real fine-tunes do
        models.append((base32 + delta).to(dt).to(device))
    vs = [torch.rand(shape, generator=g).square().to(device) * 1e-3 for _ in range(n)] \
        if second_moments else None
    return base.to(device), models, vs
