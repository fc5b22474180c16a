"""Stand-in for `triton` where it is not installed.

The kernel modules keep Triton's tutorial layout (kernels defined at module
level, beside their torch references). Without Triton those definitions only
need `triton.jit` and `tl.constexpr` to exist; nothing here ever runs a kernel,
and the torch references stay usable.
"""


def jit(fn=None, **_kwargs):
    return fn if fn is not None else (lambda f: f)


class language:  # noqa: N801  (mirrors the module name `triton.language`)
    constexpr = object
