"""TensorRT backend: plugin definitions (`plugins`), their Triton kernels (`kernels`), the pure shape, type and
launch rules they share (`launch`), engine building (`build`) and the runner (`runner`).

Importing this package imports none of tensorrt, triton or a CUDA library; each module imports them where it
needs them, and says what to install when they are missing.
"""
