"""Lets fla's Triton kernels run on a CPU under TRITON_INTERPRET=1, for parity tests only.

Import this before fla. Three gaps of the interpreter (see ../shared/research/feasibility.md, 2.2):
1. Triton's autotuner benchmarks configs through a GPU driver; here every config "takes" 0 ms.
2. fla calls `.to()` on `for` loop variables, which the interpreter leaves as Python ints; loop
   bodies are rewritten to wrap the variable as a tensor.
3. bf16 `tl.dot` multiplies raw bit patterns; we avoid it by running fla in float32 (not patched).
"""

import ast
import os

os.environ["TRITON_INTERPRET"] = "1"

import triton.runtime.autotuner as autotuner  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

autotuner.Autotuner.do_bench = property(lambda self: lambda kernel_call, quantiles=None, **kwargs: [0.0, 0.0, 0.0])


def _visit_for(self, node):
    node = self.generic_visit(node)
    if isinstance(node.target, ast.Name):
        as_tensor = ast.Assign(
            targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
            value=ast.Call(
                func=ast.Attribute(
                    value=ast.Name(id="interpreter_semantic", ctx=ast.Load()), attr="to_tensor", ctx=ast.Load()
                ),
                args=[ast.Name(id=node.target.id, ctx=ast.Load()), ast.Constant(value=False)],
                keywords=[],
            ),
        )
        ast.copy_location(as_tensor, node)
        node.body.insert(0, as_tensor)
    return node


interpreter.ASTTransformer.visit_For = _visit_for
