"""`sleepscale plan`: memory, communication and time per GPU of a training layout, predicted before a
run asks for GPUs.

- `activations`: what a micro-batch's forward keeps for backward, traced on fake tensors from the
  model's shapes and the sleep plan;
- `model_states`: weights, gradients, optimizer state and DeepSpeed's buffers per rank, by ZeRO stage;
- `communication`: tensor-parallel, pipeline and data-parallel bytes per step;
- `assumptions`: what an estimate assumes besides the config and the layout (GPU, MFU, links, reserve);
- `estimate`: one layout's estimate, the search over layouts, the largest N and smallest GPU count;
- `report`: the text the command prints;
- `command`: the command itself, from its arguments to its exit status.
"""
