"""Triton kernels of our own, each next to a plain-PyTorch reference it is tested against.

Why our own: fla covers the long-sequence case well, but sleep re-runs short windows (24-75 tokens)
many times, with gradients. fla's chunked gated-delta-rule kernel pads every window to a 64-token
chunk and launches ~5 kernels forward and ~10 backward; its fused recurrent kernel is one launch but
has no backward. The kernels here are sized for that case.

- `window_delta_rule.window_gated_delta_rule`: the gated delta rule over one window of at most 64
  tokens, with the q/k L2 normalisation and the beta/decay gates computed inside the kernel; one
  launch forward, one backward. Reference: `window_delta_rule_reference`.

Importing this package does not import Triton; the kernel modules do.
"""
