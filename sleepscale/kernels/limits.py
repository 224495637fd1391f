"""The sizes the gated-delta-rule kernels take, for the dispatcher (`sleepscale.ops`) and for config
validation, which must not import torch or Triton."""

WINDOW_MAX_LENGTH = 64  # our window kernel (window_delta_rule.py): one window of at most this many tokens
WINDOW_MAX_HEAD_DIM = 128  # ... with key and value head dimensions up to this
FLA_MAX_KEY_DIM = 256  # fla's gated delta rule kernels: key head dimensions up to this
