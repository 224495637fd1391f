"""Model parallelism for sleeping hybrids, applied from outside the model: process groups
(`groups`), tensor parallelism over megatron-core's parallel layers (`tensor`)."""
